"""Pruning sensitivity: how much each channel group costs the model's outputs when pruned alone.

For every prunable group (see :mod:`edgec.passes.channel_pruning`) and every rate, a copy of
the model has only that group pruned; its outputs are compared with the original's on the
given samples (relative error, cosine, and top-1 accuracy drop when they carry labels). The
result tells a user, or a later budget search, which groups can take a high rate and which
must stay wide; ``plot`` draws one curve per group.
"""

from __future__ import annotations

import glob
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.analysis import parameter_count
from edgec.model import to_bytes
from edgec.passes.channel_pruning import ChannelPruning, ChannelPruningOptions, channel_groups
from edgec.passes.channels import ChannelGraph
from edgec.runtime.ort import OrtRunner
from edgec.verify import InputSet, cosine, run_all

DEFAULT_RATES = (0.1, 0.2, 0.3, 0.5, 0.7)


def sensitivity(model: ir.Model, samples: InputSet, calibration: InputSet, rates: Sequence[float] = DEFAULT_RATES,
                importance: str = "l1", reconstruct: bool = False) -> dict[str, Any]:
    """Per prunable group and rate: MACs and parameters removed, and the output error it causes alone.

    ``samples`` measure the error (labels give the top-1 drop); ``calibration`` feeds
    activation importance and reconstruction. Channels are counted one by one (``round_to``
    1) so the curves show the group's own sensitivity."""
    reference = run_all(_runner(model), samples.batches)
    groups, params = channel_groups(ChannelGraph(model.graph)), parameter_count(model.graph)
    rows = []
    for group in (g for g in groups if g.classes):
        curve = []
        for rate in rates:
            options = ChannelPruningOptions(rate=rate, importance=importance, reconstruct=reconstruct, round_to=1,
                                            include=[glob.escape(name) for name in group.names()])
            result = ChannelPruning(options, calibration.batches if options.needs_data else (), "sensitivity")(model.clone())
            macs = result.details["macs"]
            point = {"rate": rate, "removed": result.details["groups"][0]["removed"],
                     "mac_reduction": round(1 - macs["after"] / macs["before"], 6),
                     "param_reduction": round(1 - parameter_count(result.model.graph) / params, 6) if params else 0.0}
            curve.append({**point, **_error(reference, run_all(_runner(result.model), samples.batches), samples.labels)})
        rows.append({"layers": group.names(), "channels": group.channels, "curve": curve})
    return {
        "rates": list(rates), "importance": importance, "reconstruct": reconstruct, "samples": samples.to_dict(),
        "groups": rows,
        "frozen_groups": [{"layers": g.names(), "reasons": g.reasons} for g in groups if not g.classes],
    }


def _runner(model: ir.Model) -> OrtRunner:
    return OrtRunner(to_bytes(model), threads=1, optimization="disabled")


def _error(reference: dict[str, np.ndarray], pruned: dict[str, np.ndarray], labels: np.ndarray | None) -> dict[str, float]:
    """Worst output's relative error (|Δ| / |reference|) and cosine, and the top-1 drop of the
    first output when ``labels`` are given."""
    errors, cosines = [], []
    for name, want in reference.items():
        got, want = pruned[name].astype(np.float64), want.astype(np.float64)
        errors.append(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
        cosines.append(cosine(want, got))
    result = {"relative_error": round(float(max(errors)), 6), "cosine": round(float(min(cosines)), 6)}
    first = next(iter(reference))
    if labels is not None and reference[first].ndim == 3:  # [batches, batch, classes]
        accuracy = [float(np.mean(out[first].reshape(-1, out[first].shape[-1]).argmax(-1) == labels)) for out in (reference, pruned)]
        result["top1_drop"] = round(accuracy[0] - accuracy[1], 6)
    return result


def plot(report: dict[str, Any]) -> bytes:
    """A PNG with one curve per group: relative output error (or top-1 drop) against MACs removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "top1_drop" if report["samples"]["labeled"] else "relative_error"
    figure, axis = plt.subplots(figsize=(8, 5), dpi=100)
    for group in report["groups"]:
        curve = group["curve"]
        axis.plot([p["mac_reduction"] * 100 for p in curve], [p[key] for p in curve], marker="o",
                  label=f"{group['layers'][0]} (+{len(group['layers']) - 1})" if len(group["layers"]) > 1 else group["layers"][0])
    axis.set_xlabel("MACs removed by pruning this group alone (%)")
    axis.set_ylabel("top-1 drop" if key == "top1_drop" else "relative output error")
    axis.set_title(f"Pruning sensitivity per channel group (rates {', '.join(map(str, report['rates']))})")
    axis.legend(fontsize=6, loc="upper left", ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
