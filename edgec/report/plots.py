"""Plots of profile measurements as inline SVG text (no files, no external references).

matplotlib's Agg backend, a fixed SVG hash salt and no date metadata make the same
measurements give the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

_STYLE = {"svg.hashsalt": "edgec", "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
_EMULATED = "#b0b0b0"
_MEASURED = "#3b6ea8"
MAX_TYPES = 12


def _svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG sits inside HTML


def latency_distribution(labels: Sequence[str], samples: Sequence[Sequence[float]], emulated: Sequence[bool]) -> str:
    """One horizontal box per measurement (whiskers 1st–99th percentile), runs as dots."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(labels) + 1.0))
        positions = range(len(labels), 0, -1)
        ax.boxplot(samples, positions=list(positions), orientation="horizontal", whis=(1, 99), showfliers=False, widths=0.55)
        for y, runs, emu in zip(positions, samples, emulated):
            offsets = [((i * 0.618) % 1 - 0.5) * 0.3 for i in range(len(runs))]  # deterministic jitter
            ax.scatter(runs, [y + o for o in offsets], s=5, alpha=0.5, color=_EMULATED if emu else _MEASURED)
        ax.set_yticks(list(positions), [f"{label} (emulated)" if emu else label for label, emu in zip(labels, emulated)])
        medians = sorted(sorted(runs)[len(runs) // 2] for runs in samples)
        if medians[0] > 0 and medians[-1] / medians[0] > 20:  # sub-ms and many-ms models side by side
            ax.set_xscale("log")
            ax.set_xlabel("latency per inference (ms, log scale)")
        else:
            ax.set_xlabel("latency per inference (ms)")
            ax.set_xlim(left=0)
        return _svg(fig)


def ops_by_type(by_type: Sequence[dict[str, Any]], median_ms: float, unaccounted_ms: float) -> str:
    """Time per op type (largest first), and the end-to-end share no op accounts for."""
    rows = list(by_type[:MAX_TYPES])
    rest = sum(r["ms"] for r in by_type[MAX_TYPES:])
    names = [r["op"] for r in rows] + (["(other types)"] if rest > 0 else []) + ["(unaccounted)"]
    values = [r["ms"] for r in rows] + ([rest] if rest > 0 else []) + [max(unaccounted_ms, 0.0)]
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(names) + 1.0))
        colors = [_MEASURED] * (len(names) - 1) + [_EMULATED]
        ax.barh(range(len(names), 0, -1), values, color=colors)
        ax.set_yticks(range(len(names), 0, -1), names)
        ax.set_xlabel(f"ms per inference (end-to-end median {median_ms:.3g} ms)")
        return _svg(fig)


def comparison(artifacts: Sequence[str], devices: Sequence[str], value: dict[tuple[str, str], float], unit: str) -> str:
    """Grouped bars: one group per artifact, one bar per device."""
    width = 0.8 / max(len(devices), 1)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        for d, device in enumerate(devices):
            xs = [a + d * width for a, artifact in enumerate(artifacts) if (artifact, device) in value]
            ys = [value[(artifact, device)] for artifact in artifacts if (artifact, device) in value]
            ax.bar(xs, ys, width=width, label=device)
        ax.set_xticks([a + 0.4 - width / 2 for a in range(len(artifacts))], artifacts, rotation=20, ha="right")
        ax.set_ylabel(unit)
        ax.legend(frameon=False)
        return _svg(fig)


def training_curve(losses: Sequence[float], validation_losses: Sequence[float], metrics: Sequence[float], metric: str) -> str:
    """Training and validation loss per epoch (left axis), the validation metric (right)."""
    epochs = list(range(1, len(losses) + 1))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        ax.plot(epochs, losses, marker="o", color=_MEASURED, label="training loss")
        ax.plot(epochs, validation_losses, marker="o", color=_MEASURED, linestyle="--", label="validation loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_xticks(epochs)
        right = ax.twinx()
        right.plot(epochs, metrics, marker="s", color="#c0504d", label=f"validation {metric}")
        right.set_ylabel(metric)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], frameon=False, loc="center right")
        return _svg(fig)


def pareto(points: Sequence[dict[str, Any]], front: Sequence[int], chosen: int | None, baselines: dict[str, dict[str, Any]],
           cost_label: str, accuracy_label: str, cost_limit: float | None = None) -> str:
    """Search candidates as cost (x) against accuracy (y), artifact size as colour; the Pareto
    front joined by a line, the chosen point ringed, baselines as labelled diamonds, the
    cost budget (when there is one on this axis) as a dashed line."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        dots = ax.scatter([p["relative_cost"] for p in points], [p["accuracy"] for p in points],
                          c=[p["size_bytes"] / 1024 for p in points], cmap="viridis", s=22, zorder=2)
        fig.colorbar(dots, ax=ax, label="artifact size (KiB)")
        ordered = sorted((points[i] for i in front), key=lambda p: p["relative_cost"])
        ax.plot([p["relative_cost"] for p in ordered], [p["accuracy"] for p in ordered], color=_MEASURED, lw=1, zorder=1,
                label="Pareto front")
        if chosen is not None:
            ax.scatter([points[chosen]["relative_cost"]], [points[chosen]["accuracy"]], s=160, facecolors="none",
                       edgecolors="#c0504d", linewidths=2, zorder=3, label="chosen")
        for name, point in baselines.items():
            ax.scatter([point["relative_cost"]], [point["accuracy"]], marker="D", s=40, color=_EMULATED, edgecolors="black", zorder=3)
            ax.annotate(name, (point["relative_cost"], point["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if cost_limit is not None:
            ax.axvline(cost_limit, color="#c0504d", linestyle="--", lw=1, label="budget")
        ax.set_xlabel(cost_label)
        ax.set_ylabel(accuracy_label)
        ax.legend(frameon=False, loc="lower right")
        return _svg(fig)
