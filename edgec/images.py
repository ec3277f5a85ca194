"""A folder of images as model input: decode, resize to the input's size, scale, normalize.

This is how users hand edgec real data for vision models (``--calib photos/``,
``--inputs photos/``) without writing numpy files. The layout comes from the model input:
channels (1 or 3) in axis 1 means NCHW, in the last axis NHWC.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgec.checks import above, finite, option
from edgec.errors import InputDataError, OptionError
from edgec.runtime import TensorSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """Pixels 0..255 are mapped linearly onto ``value_range``, then ``(x - mean) / std`` per channel."""

    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        low, high = self.value_range
        for name, values in (("value_range", self.value_range), ("mean", self.mean)):
            for value in values:
                finite(option(name, f"--image-{name.split('_')[-1]}"), value)
        if not low < high:
            raise OptionError(f"{option('value_range', '--image-range')} LO,HI needs LO < HI, not {low:g},{high:g}.",
                              hint="Give the value pixel 0 maps to first, e.g. -1,1.")
        for value in self.std:
            above(option("std", "--image-std"), value, 0)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        low, high = self.value_range
        x = pixels.astype(np.float32) / 255.0 * (high - low) + low
        if self.mean:
            x = x - np.asarray(self.mean, np.float32)
        if self.std:
            x = x / np.asarray(self.std, np.float32)
        return x


def read_image_folder(folder: Path, specs: list[TensorSpec], preprocess: ImagePreprocess) -> dict[str, np.ndarray]:
    """``{input name: [N, *sample shape]}`` for the one image input of the model."""
    spec = _image_input(folder, specs)
    files = _image_files(folder)
    channels_first = spec.shape[1] in (1, 3)
    channels = spec.shape[1] if channels_first else spec.shape[-1]
    height, width = spec.shape[2:4] if channels_first else spec.shape[1:3]
    if {len(preprocess.mean), len(preprocess.std)} - {0, channels}:
        raise InputDataError(
            f"Image mean/std must give {channels} values (one per channel) for input '{spec.name}'.",
            hint=f"Pass {channels} comma-separated numbers, or none.",
        )
    images = np.stack([_decode(path, width, height, channels) for path in files])  # N, H, W, C
    samples = preprocess.apply(images)
    if channels_first:
        samples = samples.transpose(0, 3, 1, 2)
    return {spec.name: np.ascontiguousarray(samples, dtype=spec.dtype)}


def _image_files(folder: Path) -> list[Path]:
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        names = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        what = f"has no {'/'.join(IMAGE_SUFFIXES)} file, only: {names}" if entries else "is empty"
        raise InputDataError(
            f"'{folder}' holds no images: it {what}.",
            hint=f"Put {', '.join(IMAGE_SUFFIXES)} images directly in the folder (subfolders are not searched).",
        )
    return files


def _image_input(folder: Path, specs: list[TensorSpec]) -> TensorSpec:
    def is_image(s: TensorSpec) -> bool:
        sized = len(s.shape) == 4 and all(isinstance(d, int) for d in s.shape[1:])
        return sized and (s.shape[1] in (1, 3) or s.shape[-1] in (1, 3)) and np.dtype(s.dtype).kind == "f"

    if len(specs) != 1 or not is_image(specs[0]):
        raise InputDataError(
            f"An image folder ('{folder}') can feed only a model with one float image input of static size "
            f"([N,C,H,W] or [N,H,W,C], C = 1 or 3); this one has {[(s.name, list(s.shape), str(s.dtype)) for s in specs]}.",
            hint="Save the inputs as an .npz keyed by input name instead.",
        )
    return specs[0]


def _decode(path: Path, width: int, height: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputDataError(
            f"Cannot read image '{path}': {exc}.",
            hint=f"Remove or replace the file; readable formats are {', '.join(IMAGE_SUFFIXES)}.",
        ) from exc
    return pixels.reshape(height, width, channels)
