"""A device's predictor: what one inference costs, as a sum of per-kernel-kind terms, fitted
on calibration measurements and saved with the data it was fitted on.

An inference costs a fixed part (the interpreter's invoke, one Python call per input and
output, the bytes copied in and out: :class:`Interface`) plus each kernel's cost. A kernel
kind's cost is linear in work measures with non-negative coefficients (a per-kernel
overhead, MACs, MACs with the output channels padded to the micro-kernel's tile, elements
read and written, output pixels, window positions, micro-kernel tiles): a sum of non-negative terms is how
kernels spend instructions, and it extrapolates past the sampled sizes without blowing up.
All these terms are fitted in one least-squares problem over every measurement, relative
to its cost, so a calibration model of several kernels (an int8 kernel XNNPACK runs in
float between two conversions, a layer norm) or a whole model constrains every kind it
contains. A measurement weighs in proportion to its kernels: a whole model (tens of
kernels) says how kernels add up inside a network, which one-kernel samples, thousands of
them, would otherwise outvote. nn-Meter corrects per kind with random forests on the
single-kernel samples; here such forests (a factor of up to 2 on the linear part) made
held-out models worse (on emulated-a76, 58% within ±10% instead of 87%): they learn the
single-kernel models' quirks, not the kernels'. Least squares is deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from collections import Counter, defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LinearRegression

from edgec import __version__
from edgec.errors import EdgecError
from edgec.predict.kernels import FEATURES, Kernel
from edgec.predict.tiles import Tiling, core_of, kind_tiling, tiled, variant
from edgec.profile.devices import Device

KERNEL_WEIGHT = 1.0  # a measurement's weight in the fit: its kernels to this power
MIN_SAMPLES = 3  # measurements a kind must appear in; fewer: the kind stays unknown
FORMAT = "7"  # the saved regressors' shape: a new one needs a refit (calibrate --minutes 0)
PICKLE, META, SAMPLES = "predictor.pkl", "predictor.json", "samples.jsonl"
NR = 8  # output channels an fp32 GEMM micro-kernel computes at once
TILE = 16  # output channels a micro-kernel computes at once (XNNPACK's int8 kernels; fp32 uses 8, a divisor)


class PredictorMissing(EdgecError):
    """The device has no fitted predictor (in this cache folder)."""


def cache_dir(option: str | os.PathLike[str] | None = None) -> Path:
    """Where edgec keeps what it measured: ``option``, else $EDGEC_CACHE_DIR, else
    $XDG_CACHE_HOME/edgec (~/.cache/edgec)."""
    if option is not None:
        return Path(option)
    if os.environ.get("EDGEC_CACHE_DIR"):
        return Path(os.environ["EDGEC_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgec"


def _work(shapes: np.ndarray, tiling: Tiling | None = None) -> np.ndarray:
    """Per kernel, the work measures its cost is linear in (columns: ``WORK``); ``tiling``: the
    micro-kernels XNNPACK computes the kind in (edgec/predict/tiles.py), if it is tiled."""
    hin, win, cin, hout, wout, cout, k, stride, in2, macs = shapes.T
    pixels = hout * wout
    taps = np.maximum(k, 1) ** 2
    zero = np.zeros(len(shapes))
    if tiling is None:
        padded, narrow_macs = macs / np.maximum(cout, 1) * np.ceil(cout / TILE) * TILE, zero
        tile_count, narrow_tiles, steps = np.where(k <= 1, pixels * np.ceil(cout / NR), 0), zero, zero
        tap_tiles = taps * pixels * np.ceil(cout / NR)
    else:
        depth = macs / np.maximum(pixels * cout * taps, 1)  # input channels per tap (1 for a depthwise one)
        taps = tiling.kernel_taps(taps)
        padded, tile_count, steps = tiled(pixels, cout, taps, depth, tiling.wide)
        narrow_macs, narrow_tiles, _ = tiled(pixels, cout, taps, depth, tiling.narrow) if tiling.narrow else (zero, zero, zero)
        narrow = tiling.narrow_layers(cout, k, stride)
        tap_tiles = np.where(narrow, narrow_tiles, tile_count) * taps
        padded, narrow_macs = np.where(narrow, 0, padded), np.where(narrow, narrow_macs, 0)
        tile_count, narrow_tiles = np.where(narrow, 0, tile_count), np.where(narrow, narrow_tiles, 0)
    return np.column_stack([np.ones(len(shapes)), macs, padded, narrow_macs, np.where(k <= 1, macs, 0), hin * win * cin + in2,
                            pixels * cout, pixels, pixels * taps, tap_tiles, tile_count, narrow_tiles, steps, steps * taps])


# "macs_tiled": the multiply-adds a tiled micro-kernel executes, padding included (for kinds
# without tiles: MACs with output channels padded to TILE); "macs_narrow" and "tiles_narrow":
# the same for layers XNNPACK gives its narrow micro-kernel, several times slower per
# multiply-add (fp32 output channels that do not fill tiles of 8).
# "tap_tiles": an indirect GEMM walks every kernel tap once per tile, whatever the input
# channels; with few of them (an RGB image's 3) that walk is most of the cost.
# "tiles": what a tile costs besides its multiply-adds (accumulators set up, requantized,
# stored); for kinds without tiles, the 1×1 GEMM tiles of NR channels. "steps" and
# "tap_steps": a depthwise micro-kernel's loop over the channels past its whole tiles, a
# few at a time (int8: 8), with its own cost per step and per tap.
WORK = ("kernel", "macs", "macs_tiled", "macs_narrow", "macs_1x1", "elements_in", "elements_out", "pixels_out", "window",
        "tap_tiles", "tiles", "tiles_narrow", "steps", "tap_steps")
# The fixed part's terms, from the Interface. "weights_streamed": the weight bytes past what
# the core's cache holds, which every inference reads again from a slower level (a kernel
# measured alone keeps its weights in cache; in a model of many layers they evict each other).
FIXED = ("inference", "tensors", "bytes_in", "bytes_out", "weights_streamed")


def _fixed(interface: dict[str, int], cache_bytes: float = math.inf) -> np.ndarray:
    streamed = max(0.0, interface.get("weight_bytes", 0) - cache_bytes)
    return np.array([1.0, interface["inputs"] + interface["outputs"], interface["in_bytes"], interface["out_bytes"], streamed])


@dataclasses.dataclass
class KindRegressor:
    """Cost of one kernel kind at one precision from its shape numbers."""

    coefficients: np.ndarray  # per WORK column, non-negative
    samples: int
    tiling: Tiling | None = None  # the micro-kernels the kind runs in on the device, if tiled

    def predict(self, shapes: np.ndarray) -> np.ndarray:
        return _work(shapes, self.tiling) @ self.coefficients


@dataclasses.dataclass
class Predictor:
    """Per-kernel regressors of one device (at one thread count and TFLite target), and the
    fixed cost of an inference from what it copies in and out."""

    device: dict[str, Any]
    metric: str
    threads: int
    target: str
    fixed: np.ndarray  # per FIXED term
    regressors: dict[str, KindRegressor]
    versions: dict[str, str]
    cache_bytes: float = math.inf  # the core's cache, for the fixed part's streamed weights

    @classmethod
    def fit(cls, records: list[dict], device: Device, threads: int, target: str) -> Predictor:
        """One least-squares fit of every term, relative to each measurement's cost, each
        measurement weighted by its kernels (see the module's docstring)."""
        costs = _normalised_costs(records) if not device.emulated else np.array([r["cost"] for r in records], dtype=np.float64)
        appearances = Counter(key for r in records for key in {_key(k) for k in r["kernels"]})
        keys = sorted(key for key, n in appearances.items() if n >= MIN_SAMPLES)
        core = core_of(device)
        tilings = {key: kind_tiling(kind, precision, core, which) for key in keys for kind, precision, which in [_key_parts(key)]}
        rows = [i for i, r in enumerate(records) if all(_key(k) in keys for k in r["kernels"])]
        design = np.array([_design_row(records[i], keys, tilings, core.cache_bytes) for i in rows])
        scale = np.maximum(np.abs(design).max(axis=0), 1e-30)
        weight = np.array([len(records[i]["kernels"]) for i in rows], dtype=np.float64) ** KERNEL_WEIGHT
        fit = LinearRegression(positive=True, fit_intercept=False).fit(design / scale / costs[rows, None], np.ones(len(rows)),
                                                                       sample_weight=weight)
        weights = fit.coef_ / scale
        width = len(WORK)
        regressors = {key: KindRegressor(weights[len(FIXED) + i * width:len(FIXED) + (i + 1) * width], appearances[key], tilings[key])
                      for i, key in enumerate(keys)}
        return cls(device.summary(), "instructions" if device.emulated else "ms", threads, target,
                   weights[:len(FIXED)], regressors, versions(), core.cache_bytes)

    def fixed_cost(self, interface: dict[str, int]) -> float:
        """What an inference costs whatever it computes: invoke, and copying its inputs and outputs."""
        return float(_fixed(interface, self.cache_bytes) @ self.fixed)

    def kernel_costs(self, kernels: list[Kernel]) -> list[float | None]:
        """Each kernel's predicted cost; None for kinds without a regressor (unknown)."""
        by_key: dict[str, list[int]] = defaultdict(list)
        for i, kernel in enumerate(kernels):
            by_key[regressor_key(kernel.kind, kernel.precision, kernel.shape[FEATURES.index("k")])].append(i)
        costs: list[float | None] = [None] * len(kernels)
        for key, indices in by_key.items():
            if key in self.regressors:
                shapes = np.array([kernels[i].shape for i in indices], dtype=np.float64)
                for i, cost in zip(indices, self.regressors[key].predict(shapes)):
                    costs[i] = float(cost)
        return costs

    def summary(self) -> dict[str, Any]:
        return {"device": self.device, "metric": self.metric, "threads": self.threads, "target": self.target,
                "fixed": dict(zip(FIXED, map(float, self.fixed))),
                "kernels": {key: r.samples for key, r in sorted(self.regressors.items())}, "versions": self.versions}


def regressor_key(kind: str, precision: str, k: int) -> str:
    """Which regressor prices a kernel: its kind and precision, and for kinds XNNPACK runs in
    several micro-kernels, which one (tiles.variant: a depthwise convolution's taps)."""
    which = variant(kind, precision, k)
    return f"{kind}/{precision}/{which}" if which else f"{kind}/{precision}"


def _key_parts(key: str) -> tuple[str, str, int]:
    kind, precision, *which = key.split("/")
    return kind, precision, int(which[0]) if which else 0


def _key(entry: dict) -> str:
    return regressor_key(entry["kind"], entry["precision"], entry["k"])


def _design_row(record: dict, keys: list[str], tilings: dict[str, Tiling | None], cache_bytes: float) -> np.ndarray:
    """The record's fixed terms, then per kind its kernels' summed work measures."""
    width = len(WORK)
    row = np.zeros(len(FIXED) + width * len(keys))
    row[:len(FIXED)] = _fixed(record["io"], cache_bytes)
    for entry in record["kernels"]:
        start = len(FIXED) + keys.index(_key(entry)) * width
        row[start:start + width] += _work(np.array([[entry[f] for f in FEATURES]], dtype=np.float64), tilings[_key(entry)])[0]
    return row


def _normalised_costs(records: list[dict]) -> np.ndarray:
    """Costs rescaled by their batch's trivial model against the median one: on a CPU whose
    load drifts between batches, this takes the drift out. Emulated counts do not drift (the
    trivial model's count still wanders by a few hundred instructions: not rescaled by)."""
    bases = np.array([r["base"] for r in records], dtype=np.float64)
    return np.array([r["cost"] for r in records], dtype=np.float64) * np.median(bases) / bases


def versions() -> dict[str, str]:
    """What a predictor depends on: a new runtime or scikit-learn calls for a new calibration."""
    return {"edgec": __version__, "predictor": FORMAT, "scikit-learn": metadata.version("scikit-learn"),
            "ai-edge-litert": metadata.version("ai-edge-litert")}


class PredictorStore:
    """One device's folder in the cache: its calibration samples and its fitted predictor."""

    def __init__(self, cache: Path, device: str):
        self.device = device
        self.folder = cache / "predictors" / device

    def samples(self) -> list[dict]:
        path = self.folder / SAMPLES
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def append(self, records: list[dict]) -> list[dict]:
        """Add a batch's records to the samples file (one line each, flushed: a resumable log)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / SAMPLES, "a") as file:
            file.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return records

    def rewrite(self, records: list[dict]) -> None:
        """Replace the samples file with ``records`` (written aside, then moved over it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        aside = self.folder / f"{SAMPLES}.new"
        aside.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        aside.replace(self.folder / SAMPLES)

    def save(self, predictor: Predictor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / PICKLE).write_bytes(pickle.dumps(predictor))
        (self.folder / META).write_text(json.dumps(predictor.summary(), indent=2, sort_keys=True) + "\n")

    def load(self) -> Predictor:
        path = self.folder / PICKLE
        if not path.is_file():
            raise PredictorMissing(f"Device '{self.device}' has no latency predictor in '{self.folder.parent}'.",
                                   hint=f"Run `edgec device calibrate {self.device}` first (a budget in minutes, "
                                        "e.g. --minutes 10), with the same --cache-dir if you gave one.")
        predictor: Predictor = pickle.loads(path.read_bytes())
        if predictor.versions != versions():
            raise PredictorMissing(f"Device '{self.device}''s predictor was fitted with {predictor.versions}, "
                                   f"and edgec now runs {versions()}.",
                                   hint=f"Run `edgec device calibrate {self.device} --minutes 0`: it refits on the "
                                        "saved measurements (a new runtime version needs new ones: give it minutes).")
        return predictor
