"""A device's predictor: one regressor per kernel kind and precision, fitted on calibration
measurements, saved with the data it was fitted on.

Each regressor has two stages. A power law of the work (log cost linear in the logs of MACs,
elements read and elements written) gives the cost's scale and extrapolates sensibly past
the sampled sizes; a random forest on the logs of all shape numbers corrects it by a factor
(tiling, cache and kernel-choice effects, which nn-Meter also fits with random forests).
Fitting logs keeps a few slow outliers from swamping the rest. A fixed seed and one
job make predictions deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression

from edgec import __version__
from edgec.errors import EdgecError
from edgec.predict.kernels import FEATURES, Kernel
from edgec.profile.devices import Device

MIN_SAMPLES = 3  # fewer: the kind stays unknown
MIN_FOREST = 8  # fewer: the linear stage alone
FLOOR = 0.01  # a kernel costs at least this share of the trivial model (noise can make a difference negative)
CONVERT = "CONVERT/int8"
FORMAT = "2"  # the saved regressors' shape: a new one needs a refit (calibrate --minutes 0)
PICKLE, META, SAMPLES = "predictor.pkl", "predictor.json", "samples.jsonl"


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


def _log_features(shapes: np.ndarray) -> np.ndarray:
    """The shape numbers with elements in (both inputs) and out, and the work's three
    measures first (MACs, elements in, elements out), all as log(1 + x)."""
    index = {name: i for i, name in enumerate(FEATURES)}
    elems_in = shapes[:, index["hin"]] * shapes[:, index["win"]] * shapes[:, index["cin"]] + shapes[:, index["in2"]]
    elems_out = shapes[:, index["hout"]] * shapes[:, index["wout"]] * shapes[:, index["cout"]]
    return np.log1p(np.column_stack([shapes[:, index["macs"]], elems_in, elems_out, shapes]))


WORK = 3  # the first three log features: what the power law is fitted on


@dataclasses.dataclass
class KindRegressor:
    """Cost of one kernel kind at one precision from its shape numbers."""

    power: LinearRegression  # log cost from log work: a power law, which extrapolates past the samples
    forest: RandomForestRegressor | None  # the power law's residual (log) from all shape numbers
    samples: int

    @classmethod
    def fit(cls, shapes: np.ndarray, costs: np.ndarray) -> KindRegressor:
        features, log_costs = _log_features(shapes), np.log(costs)
        regressor = cls(LinearRegression().fit(features[:, :WORK], log_costs), None, len(costs))
        if len(costs) >= MIN_FOREST:
            regressor.forest = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=0, n_jobs=1)
            regressor.forest.fit(features, log_costs - regressor.power.predict(features[:, :WORK]))
        return regressor

    def predict(self, shapes: np.ndarray) -> np.ndarray:
        features = _log_features(shapes)
        log_costs = self.power.predict(features[:, :WORK])
        if self.forest is not None:
            log_costs += self.forest.predict(features)
        return np.exp(log_costs)


@dataclasses.dataclass
class Predictor:
    """Per-kernel regressors of one device (at one thread count and TFLite target), and the
    cost every inference has whatever it computes (``base``)."""

    device: dict[str, Any]
    metric: str
    threads: int
    target: str
    base: float
    regressors: dict[str, KindRegressor]
    versions: dict[str, str]

    @classmethod
    def fit(cls, records: list[dict], device: Device, threads: int, target: str) -> Predictor:
        base = float(np.median([r["base"] for r in records]))
        data = _single_kernel_data(records)
        regressors = {key: KindRegressor.fit(*_arrays(rows)) for key, rows in data.items() if len(rows) >= MIN_SAMPLES}
        predictor = cls(device.summary(), "instructions" if device.emulated else "ms", threads, target, base,
                        regressors, versions())
        conversions = predictor._conversion_data(records)
        if len(conversions) >= MIN_SAMPLES:
            regressors[CONVERT] = KindRegressor.fit(*_arrays(conversions))
        return predictor

    def kernel_costs(self, kernels: list[Kernel]) -> list[float | None]:
        """Each kernel's predicted cost; None for kinds without a regressor (unknown)."""
        by_key: dict[str, list[int]] = defaultdict(list)
        for i, kernel in enumerate(kernels):
            by_key[kernel.key].append(i)
        costs: list[float | None] = [None] * len(kernels)
        for key, indices in by_key.items():
            if key in self.regressors:
                shapes = np.array([kernels[i].shape for i in indices], dtype=np.float64)
                for i, cost in zip(indices, self.regressors[key].predict(shapes)):
                    costs[i] = float(cost)
        return costs

    def _conversion_data(self, records: list[dict]) -> list[tuple[tuple[int, ...], float]]:
        """Conversions measured around kernels int8 keeps float: the record's cost beyond its
        other (already predicted) kernels, shared among its conversions by elements."""
        rows = []
        for record in records:
            kernels = [_kernel(k) for k in record["kernels"]]
            converts = [k for k in kernels if k.key == CONVERT]
            others = [k for k in kernels if k.key != CONVERT]
            predicted = self.kernel_costs(others)
            if not converts or len(converts) == len(kernels) or None in predicted:
                continue
            rest = record["cost"] - record["base"] - sum(predicted)
            elements = [k.shape[FEATURES.index("macs")] for k in converts]
            rows += [(k.shape, max(rest * e / sum(elements), FLOOR * record["base"])) for k, e in zip(converts, elements)]
        return rows

    def summary(self) -> dict[str, Any]:
        return {"device": self.device, "metric": self.metric, "threads": self.threads, "target": self.target,
                "base": self.base, "kernels": {key: r.samples for key, r in sorted(self.regressors.items())},
                "versions": self.versions}


def _kernel(entry: dict) -> Kernel:
    return Kernel(entry["kind"], entry["precision"], tuple(entry[f] for f in FEATURES), entry["operator"])


def _single_kernel_data(records: list[dict]) -> dict[str, list[tuple[tuple[int, ...], float]]]:
    """Records whose artifact is one kernel: that kernel's cost is what the record measured."""
    data: dict[str, list] = defaultdict(list)
    for record in records:
        if len(record["kernels"]) == 1:
            kernel = _kernel(record["kernels"][0])
            data[kernel.key].append((kernel.shape, max(record["cost"] - record["base"], FLOOR * record["base"])))
    return data


def _arrays(rows: list[tuple[tuple[int, ...], float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s for s, _ in rows], dtype=np.float64), np.array([c for _, c in rows], dtype=np.float64)


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
