"""How well a device's predictor does on real models it was not fitted on: what ``make bench``
reports.

Calibration's synthetic single-kernel models teach each kernel kind; whole models teach
what single kernels cannot (kernels' effects on each other, shapes no sample drew). So the
evaluation splits the measured models into two halves by model (fp32 and int8 of one model
stay together), fits on the calibration samples plus one half, predicts the other, and
swaps. Pretrained models are never fitted on; each is predicted by the fold that was not
fitted on its zoo twin (the zoo's conversion of it), if it has one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from edgec.predict.kernels import interface_of, kernels_of
from edgec.predict.model import Predictor
from edgec.profile.devices import Device

FOLDS = 2


@dataclasses.dataclass(frozen=True)
class Measured:
    """One artifact of a model, and its cost measured the way calibration measures."""

    model: str
    precision: str
    path: Path
    cost: float
    pretrained: bool = False


def model_record(content: bytes, cost: float, base: float, threads: int, name: str) -> dict:
    """A whole model as a calibration record: its kernels, interface and measured cost."""
    return {"batch": -1, "sample": {"artifact": name}, "kernels": [k.to_dict() for k in kernels_of(content)],
            "io": interface_of(content).to_dict(), "cost": cost, "base": base, "threads": threads}


def cross_validate(samples: list[dict], measured: list[Measured], device: Device, threads: int, target: str) -> list[dict]:
    """Each measured artifact's prediction by a predictor fitted without its model."""
    base = float(np.median([r["base"] for r in samples]))
    records = {m: model_record(m.path.read_bytes(), m.cost, base, threads, f"{m.model}/{m.precision}") for m in measured}
    models = sorted({m.model for m in measured if not m.pretrained})
    rows = []
    for fold in range(FOLDS):
        fitted_on = set(models[fold::FOLDS])
        fitted = [r for m, r in records.items() if m.model in fitted_on and not m.pretrained]
        predictor = Predictor.fit(samples + fitted, device, threads, target)
        rows += [_row(predictor, m, records[m], sorted(fitted_on)) for m in measured
                 if m.model not in fitted_on and (m.model in models or fold == 0)]
    return rows


def _row(predictor: Predictor, measured: Measured, record: dict, fitted_on: list[str]) -> dict:
    kernels = kernels_of(measured.path.read_bytes())
    costs = predictor.kernel_costs(kernels)
    predicted = predictor.fixed_cost(record["io"]) + sum(c for c in costs if c is not None)
    return {"model": measured.model, "precision": measured.precision, "pretrained": measured.pretrained,
            "predicted": predicted, "measured": measured.cost,
            "error": predicted / measured.cost - 1, "fitted_with": fitted_on,
            "unknown_kernels": sorted({k.key for k, c in zip(kernels, costs) if c is None})}


def accuracy(rows: list[dict]) -> dict[str, float | None]:
    """RMSPE and the share of predictions within ±10% of the measurement."""
    errors = np.array([r["error"] for r in rows])
    if not len(errors):
        return {"rmspe": None, "within_10pct": None, "n": 0}
    return {"rmspe": round(float(np.sqrt(np.mean(errors ** 2))), 4),
            "within_10pct": round(float(np.mean(np.abs(errors) <= 0.1)), 3), "n": len(errors)}
