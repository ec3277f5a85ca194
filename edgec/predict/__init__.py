"""Per-device latency prediction from kernels, in the style of nn-Meter (MobiSys 2021).

``edgec device calibrate D`` measures single-kernel models on device D and fits one
regressor per kernel kind (edgec/predict/calibrate.py, model.py); ``predict`` then splits an
artifact into the kernels its runtime executes (kernels.py) and sums their predicted costs:
milliseconds on a real CPU, instructions per inference on an emulated core.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgec.predict.kernels import detect, interface_of
from edgec.predict.model import Predictor, PredictorMissing, PredictorStore, cache_dir
from edgec.profile.devices import Device, get_device

__all__ = ["Predictor", "PredictorMissing", "PredictorStore", "cache_dir", "predict", "predict_cost"]


def predict(artifact: str | os.PathLike[str], device: Device, cache: Path | None = None) -> dict[str, Any]:
    """The predicted cost of one inference of ``artifact`` on ``device``, kernel by kernel.

    Kernels of kinds the predictor has no regressor for are listed in ``unknown`` and add
    nothing: the prediction is then a lower bound, and says so."""
    predictor = PredictorStore(cache_dir(cache), device.name).load()
    kernels = detect(Path(artifact))
    costs = predictor.kernel_costs(kernels)
    base = predictor.fixed_cost(interface_of(Path(artifact).read_bytes()).to_dict())
    total = base + sum(c for c in costs if c is not None)
    return {
        "artifact": str(artifact),
        "device": device.name,
        "metric": predictor.metric,
        "predicted": total,
        "threads": predictor.threads,
        "base": base,
        "kernels": [{**k.to_dict(), "predicted": c, "share": None if c is None else c / total}
                    for k, c in zip(kernels, costs)],
        "unknown": sorted({k.key for k, c in zip(kernels, costs) if c is None}),
    }


def predict_cost(artifact: str | os.PathLike[str], device: Device | str, cache: Path | None = None) -> float:
    """The predicted cost of one inference (ms, or instructions on an emulated core): what a
    search compares candidates by instead of measuring each. Raises PredictorMissing without
    a fitted predictor for ``device``; unknown kernels add nothing (see :func:`predict`)."""
    return predict(artifact, get_device(device) if isinstance(device, str) else device, cache)["predicted"]
