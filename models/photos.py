"""Real photographs for calibrating and checking the pretrained (image) models.

No download at run time and no private data: the photos ship inside registry wheels, the
scikit-image wheel's ``skimage/data`` (astronaut, chelsea, coffee, rocket, motorcycles,
Hubble deep field, retina; public domain or CC0/CC-BY per scikit-image's data README) and
scikit-learn's ``datasets/images`` (china.jpg, flower.jpg; CC-BY, see its README.txt).
Seeded square crops of them, 256x256 JPEG, go to ``data/photos/calib`` and
``data/photos/eval``; the two sets come from different photographs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

import wheels

SKIMAGE_WHEEL = "scikit-image==0.25.2"
CALIB = {"sklearn": ["china.jpg", "flower.jpg"], "skimage": ["chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]}
EVAL = {"skimage": ["astronaut.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg"]}
CROPS_PER_PHOTO = {"calib": 4, "eval": 3}
SIZE = 256


def _photo(source: str, name: str, cache: Path) -> Image.Image:
    if source == "skimage":
        content = wheels.extract(wheels.fetch_wheel(cache, SKIMAGE_WHEEL), f"skimage/data/{name}")
    else:
        import sklearn.datasets

        content = (Path(sklearn.datasets.__file__).parent / "images" / name).read_bytes()
    return Image.open(io.BytesIO(content)).convert("RGB")


def _crops(photo: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    """``count`` square crops covering 50-100% of the short side, resized to SIZE."""
    width, height = photo.size
    crops = []
    for _ in range(count):
        side = int(rng.uniform(0.5, 1.0) * min(width, height))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(photo.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR))
    return crops


def write_photos(folder: Path, cache: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, sources in (("calib", CALIB), ("eval", EVAL)):
        out = folder / split
        out.mkdir(parents=True, exist_ok=True)
        index = 0
        for source, names in sources.items():
            for name in names:
                for crop in _crops(_photo(source, name, cache), CROPS_PER_PHOTO[split], rng):
                    crop.save(out / f"{index:02d}.jpg", quality=90, optimize=False)
                    index += 1
