"""The device latency report: ``profile.json`` (schema in README.md, "Profiling") and a
self-contained ``report.html`` with the stats, latency distributions, per-op breakdowns and a
comparison of artifacts across devices."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import PurePath
from typing import Any

import jinja2

from edgec import __version__
from edgec.profile.schema import ProfileSettings
from edgec.report import plots, versions

REPORT_SCHEMA = "edgec.profile-report/1"


def profile_report(measurements: Sequence[dict[str, Any]], settings: ProfileSettings) -> dict[str, Any]:
    """What ``profile.json`` holds: the settings and every measurement as taken."""
    return {
        "schema": REPORT_SCHEMA,
        "edgec_version": __version__,
        "settings": dataclasses.asdict(settings),
        "measurements": list(measurements),
        "versions": versions(),
    }


def labels(measurements: Sequence[dict[str, Any]]) -> list[str]:
    """Artifact names for display: paths without the folders all of them share (variants of
    one model share a file name, so the folder that tells them apart stays)."""
    paths = [PurePath(m["artifact"].get("path") or m["artifact"]["file"]) for m in measurements]
    try:
        shared = len(PurePath(os.path.commonpath([p.parent for p in paths])).parts)
    except ValueError:  # absolute and relative paths mixed
        shared = 0
    return [str(PurePath(*p.parts[shared:])) for p in paths]


def render_html(report: dict[str, Any], title: str = "edgec device latency report") -> str:
    measurements = report["measurements"]
    names = labels(measurements)
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        resources.files("edgec.report").joinpath("templates/profile.html").read_text()
    )
    return template.render(
        title=title,
        edgec_version=report["edgec_version"],
        settings_text=_settings_text(report["settings"]),
        rows=[{**_row(m, name), "relative": ratio} for m, name, ratio in zip(measurements, names, _relative(measurements))],
        pinning_text="; ".join(f"{name}: {m['runtime'].get('pinned_cpus') or 'not pinned'}" for m, name in zip(measurements, names)),
        memory_text=_memory_text(measurements),
        distribution_svg=plots.latency_distribution(
            [f"{name} @ {m['device']['name']}" for m, name in zip(measurements, names)],
            [m["latency_ms"].get("samples") or [m["latency_ms"]["median"]] for m in measurements],
            [m["device"]["emulated"] for m in measurements],
        ),
        comparison_svg=_comparison_svg(measurements, names),
        **_cost_plot(measurements, names),
        ops=[_ops(m, name) for m, name in zip(measurements, names) if m.get("ops")],
    )


def _settings_text(settings: dict[str, Any]) -> str:
    runs = f"{settings['runs']} runs" + (f" within {settings['budget_s']} s" if settings.get("budget_s") else "")
    threads = f"{settings['threads']} thread(s)" if settings.get("threads") else "the device's default threads"
    return f"{settings['warmup']} warm-up runs, {runs}, {threads}, random inputs (seed {settings['seed']})"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _row(m: dict[str, Any], name: str) -> dict[str, Any]:
    latency, ops = m["latency_ms"], m.get("ops") or {}
    return {
        "label": name, "device": m["device"]["name"], "emulated": m["device"]["emulated"],
        "runtime": f"{m['runtime']['name']} {m['runtime']['version']}", "threads": m["runtime"]["threads"],
        "load_ms": _ms(m.get("load_ms")), "first_run_ms": _ms(m.get("first_run_ms")),
        **{key: _ms(latency[key]) for key in ("median", "min", "mean", "p90", "p99", "std")},
        "runs": latency["runs"], "peak_mb": _peak(m),
        "ops_total": _ms(ops.get("total_ms")), "unaccounted": _percent(ops.get("unaccounted_share")),
        "cost": ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in (m.get("cost") or {}).items()) or "-",
    }


def _peak(m: dict[str, Any]) -> str:
    """Peak RSS, and how much of it came after loading began where the device says."""
    peak, before = m.get("peak_memory_mb"), (m.get("memory") or {}).get("rss_before_load_mb")
    return _ms(peak) if peak is None or before is None else f"{peak:.4g} (+{peak - before:.3g})"


def _relative(measurements: Sequence[dict[str, Any]]) -> list[str]:
    """Each measurement ÷ the first on the same device: the median, or on an emulated device
    the first cost figure (its wall time is no board's latency)."""
    first: dict[str, dict[str, Any]] = {}
    ratios = []
    for m in measurements:
        base = first.setdefault(m["device"]["name"], m)
        key = _cost_key([base, m]) if m["device"]["emulated"] else None
        value, reference = (m["cost"][key], base["cost"][key]) if key else (m["latency_ms"]["median"], base["latency_ms"]["median"])
        ratios.append(f"{value / reference:.2f}×" + (f" ({key})" if key else "") if reference else "-")
    return ratios


def _cost_key(costed: Sequence[dict[str, Any]]) -> str | None:
    """The first cost figure every one of ``costed`` has as a number."""
    costs = [m.get("cost") or {} for m in costed]
    keys = [k for k in sorted(costs[0]) if all(isinstance(c.get(k), (int, float)) for c in costs)]
    return keys[0] if keys else None


def _memory_text(measurements: Sequence[dict[str, Any]]) -> str:
    methods = sorted({(m.get("memory") or {}).get("method", "as reported by the device") for m in measurements})
    return "; ".join(methods)


def _comparison_svg(measurements: Sequence[dict[str, Any]], names: Sequence[str]) -> str | None:
    measured = [(m, name) for m, name in zip(measurements, names) if not m["device"]["emulated"]]
    if len(measured) < 2:
        return None
    medians = {(name, m["device"]["name"]): m["latency_ms"]["median"] for m, name in measured}
    return _grouped(medians, "median latency (ms)")


def _grouped(values: dict[tuple[str, str], float], unit: str) -> str:
    artifacts = list(dict.fromkeys(artifact for artifact, _ in values))
    devices = list(dict.fromkeys(device for _, device in values))
    return plots.comparison(artifacts, devices, values, unit)


def _cost_plot(measurements: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """A plot of the first numeric cost figure every costed measurement has, if any."""
    costed = [(m, name) for m, name in zip(measurements, names) if m.get("cost")]
    key = _cost_key([m for m, _ in costed]) if costed else None
    if key is None:
        return {"cost_svg": None, "cost_caption": ""}
    values = {(name, m["device"]["name"]): m["cost"][key] for m, name in costed}
    caption = f"Deterministic cost ({key}) per artifact and device: what compares variants on emulated devices."
    return {"cost_svg": _grouped(values, key), "cost_caption": caption}


def _ops(m: dict[str, Any], name: str) -> dict[str, Any]:
    ops = m["ops"]
    base = {"label": name, "device": m["device"]["name"]}
    if "unavailable" in ops:
        return {**base, "unavailable": ops["unavailable"]}
    return {
        **base, "unavailable": None, "total": _ms(ops["total_ms"]), "median": _ms(ops["end_to_end_median_ms"]),
        "unaccounted_ms": _ms(ops["unaccounted_ms"]), "unaccounted": _percent(ops["unaccounted_share"]),
        "negative": ops["unaccounted_ms"] < 0,
        "profiled_run": _ms(ops.get("profiled_run_ms")), "coverage": _percent(ops.get("profiled_coverage")),
        "svg": plots.ops_by_type(ops["by_type"], ops["end_to_end_median_ms"], ops["unaccounted_ms"]),
        "top_nodes": [{**n, "ms": _ms(n["ms"]), "share": _percent(n["share"])} for n in ops["top_nodes"]],
        "method": ops["method"], "runs": ops["runs"], "note": ops.get("note", ""),
    }
