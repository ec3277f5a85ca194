"""The zoo's data: scikit-learn's copy of the UCI handwritten digits, split and preprocessed.

Real labelled data that ships inside a registry package (no download at run time). The
same split and preprocessing feed training and the committed eval / calib files, so the
accuracies in zoo.json are measured on exactly the arrays in ``models/data/``.

Split: stratified ``train_test_split(random_state=0)``, 600 images held out for evaluation;
128 of the training split (again stratified, ``random_state=0``) kept as a calibration set
(they stay in the training split: quantization calibrates on data the model was fitted to).
Preprocessing: x/16, bilinear 8x8 -> 32x32 upsample (half-pixel centres, i.e. torch's
``align_corners=False``), then (x - 0.5) / 0.5.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_EVAL = 600
N_CALIB = 128
SEED = 0
SIZE = 32
# Fixed zip member date: np.savez stamps the current time, which breaks byte-identical rebuilds.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Split:
    """Raw 8x8 digits (float64, values 0..16) and their int64 labels."""

    pixels: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Digits:
    """Training split, held-out evaluation split, calibration subset of the training split."""

    train: Split
    eval: Split
    calib: Split


def load() -> Digits:
    """Load scikit-learn's digits and split them (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels, labels = bunch.images.astype(np.float64), bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train, held_out = train_test_split(index, test_size=N_EVAL, stratify=labels, random_state=SEED)
    _, calib = train_test_split(train, test_size=N_CALIB, stratify=labels[train], random_state=SEED)
    pick = lambda ids: Split(pixels[ids], labels[ids])  # noqa: E731
    return Digits(train=pick(train), eval=pick(held_out), calib=pick(calib))


def bilinear_weights(src: int, dst: int) -> np.ndarray:
    """[dst, src] bilinear interpolation matrix with half-pixel centres (align_corners=False)."""
    weights = np.zeros((dst, src), dtype=np.float64)
    for out in range(dst):
        centre = min(max((out + 0.5) * src / dst - 0.5, 0.0), src - 1.0)
        low = int(np.floor(centre))
        high = min(low + 1, src - 1)
        frac = centre - low
        weights[out, low] += 1.0 - frac
        weights[out, high] += frac
    return weights


def upsample(pixels: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in [0, 1] -> [N, 32, 32]; plain einsum loops, no BLAS thread dependence."""
    weights = bilinear_weights(pixels.shape[-1], SIZE)
    return np.einsum("ij,njk,lk->nil", weights, pixels, weights)


def normalize(unit: np.ndarray) -> np.ndarray:
    """[0, 1] -> [-1, 1] as float32."""
    return ((unit - 0.5) / 0.5).astype(np.float32)


def nchw(split: Split) -> np.ndarray:
    """Model input of the torch CNNs: [N, 1, 32, 32]."""
    return normalize(upsample(split.pixels / 16.0))[:, None]


def nhwc(split: Split) -> np.ndarray:
    """Model input of the Keras CNN: [N, 32, 32, 1]."""
    return normalize(upsample(split.pixels / 16.0))[..., None]


def flat(split: Split) -> np.ndarray:
    """Model input of the MLP: the 8x8 image flattened, [N, 64]."""
    return normalize(split.pixels / 16.0).reshape(len(split.labels), 64)


def tokens(split: Split) -> np.ndarray:
    """Model input of the transformer: 8 row tokens of 8 features, [N, 8, 8]."""
    return normalize(split.pixels / 16.0)


# layout name -> (array maker, model input name = npz key)
LAYOUTS: dict[str, tuple[Callable[[Split], np.ndarray], str]] = {
    "nchw": (nchw, "image"),
    "nhwc": (nhwc, "image"),
    "flat": (flat, "features"),
    "tokens": (tokens, "tokens"),
}


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an np.load-able .npz whose bytes depend only on the arrays (fixed zip dates)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            archive.writestr(info, buffer.getvalue())


def write_data(digits: Digits, folder: Path) -> list[Path]:
    """Write digits_{eval,calib}_{nchw,nhwc,flat,tokens}.npz into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split_name in ("eval", "calib"):
        split = getattr(digits, split_name)
        for layout, (make, key) in LAYOUTS.items():
            path = folder / f"digits_{split_name}_{layout}.npz"
            save_npz(path, {key: make(split), "label": split.labels})
            written.append(path)
    return written
