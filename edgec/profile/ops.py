"""Per-op breakdown: where an inference's time goes, by op type and by node.

Each runtime's own profiler gives kernel times per node and run; this module turns them into
one shape (the ``ops`` entry of a measurement, see edgec/profile/schema.py)::

    {"method": "...", "runs": 50, "typical_runs": 26, "resolution_us": 1, "rounding_bound_ms": 0.03,
     "total_ms": 1.84,                  # op times of a typical profiled run (see typical_runs)
     "end_to_end_median_ms": 1.97,      # the measurement's median, for comparison
     "unaccounted_ms": 0.13, "unaccounted_share": 0.066,   # framework overhead between ops
     "profiled_run_ms": 2.1,            # wall time of those typical runs, as their profiler saw it
     "profiled_coverage": 0.88,         # total_ms / profiled_run_ms: ops' share inside those runs
     "by_type": [{"op": "Conv", "ms": 1.2, "share": 0.65, "nodes": 12}, ...],
     "top_nodes": [{"node": "/conv1/Conv", "op": "Conv", "ms": 0.3, "share": 0.16}, ...],
     "note": "..."}

Where a runtime cannot profile ops, the entry is ``{"unavailable": "<why>"}``.
The profiled runs happen in a second session with the profiler on; only their op times are
used, against the end-to-end median of the unprofiled runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgec.profile.device_runner import timed_samples
from edgec.runtime.ort import OrtRunner

TOP_NODES = 20
WARMUP = 3
FLOOR_NODES, FLOOR_RUNS = 64, 20  # the no-op chain that measures ORT's profiler floor


@dataclasses.dataclass
class ProfiledRun:
    """One profiled inference: its wall time and each node's time, in microseconds."""

    wall_us: float
    op_us: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # (node, op type) → time

    def add(self, node: str, op: str, us: float) -> None:
        self.op_us[(node, op)] = self.op_us.get((node, op), 0.0) + us


@dataclasses.dataclass(frozen=True)
class Profiled:
    """What a runtime's profiler reported."""

    runs: list[ProfiledRun]
    method: str
    note: str = ""


def operator_breakdown(path: Path, threads: int, feeds: Mapping[str, np.ndarray], median_ms: float, runs: int = 20) -> dict[str, Any]:
    """Profile ``runs`` inferences of the artifact with its runtime's profiler and summarize
    them beside the end-to-end ``median_ms``."""
    profiled = profile_artifact(path, threads, feeds, runs)
    if isinstance(profiled, str):
        return {"unavailable": profiled}
    return summarize(profiled, median_ms)


def profile_artifact(path: Path, threads: int, feeds: Mapping[str, np.ndarray], runs: int) -> Profiled | str:
    """``runs`` profiled inferences by the artifact's runtime, or why its ops cannot be profiled."""
    if path.suffix != ".tflite":
        return profile_ort(path, threads, feeds, runs)
    from edgec.profile.litert_ops import ProfilerUnavailable, profile_litert

    try:
        return profile_litert(path, threads, runs, WARMUP)
    except ProfilerUnavailable as exc:
        return str(exc)


def profile_ort(path: Path, threads: int, feeds: Mapping[str, np.ndarray], runs: int) -> Profiled:
    """ONNX Runtime's profiler (SessionOptions.enable_profiling): a Chrome trace with one
    ``<node>_kernel_time`` event per node and run, inside ``model_run`` events. Each event
    is reduced by the profiler's own floor (:func:`ort_profiler_floor_us`)."""
    floor = ort_profiler_floor_us(threads)
    model_runs, node_events = _ort_events(path, threads, feeds, runs)
    profiled = [ProfiledRun(e["dur"]) for e in model_runs]
    for run, events in zip(profiled, _by_run(model_runs, node_events)):
        for e in events:
            run.add(e["name"].removesuffix("_kernel_time"), e["args"].get("op_name", "?"), max(e["dur"] - floor, 0.0))
    note = (f"ONNX Runtime's profiler adds {floor:.2f} µs to each node's time (its own bookkeeping and "
            "whole-µs rounding, measured on a chain of Relu nodes with and without it); that is subtracted "
            "from every node's time.")
    return Profiled(profiled, "onnxruntime profiler (SessionOptions.enable_profiling): kernel time per node", note)


def _ort_events(model: Path | bytes, threads: int, feeds: Mapping[str, np.ndarray], runs: int,
                optimization: str = "all") -> tuple[list[dict], list[dict]]:
    """The ``model_run`` events after warm-up, in time order, and the node events inside them."""
    with tempfile.TemporaryDirectory(prefix="edgec-ort-profile-") as tmp:
        runner = OrtRunner(model, threads=threads, optimization=optimization, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(WARMUP + runs):
            runner.run(feeds)
        events = json.loads(Path(runner.session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[WARMUP:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= model_runs[0]["ts"]]
    return model_runs, nodes


@functools.cache
def ort_profiler_floor_us(threads: int) -> float:
    """How much ONNX Runtime's profiler adds to each node's reported time.

    Measured on a chain of Relu nodes on one float: without the profiler such a node takes
    about 0.3 µs; the profiler reports 1.0–1.3 µs (its timestamps and bookkeeping inside the
    event, and durations in whole µs). On models of many tiny nodes (blazeface: 120 nodes of
    3–17 µs) that excess alone put the op total 15–20% above the end-to-end median.
    """
    chain = [onnx.helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"relu{i}") for i in range(FLOOR_NODES)]
    graph = onnx.helper.make_graph(chain, "floor", [onnx.helper.make_tensor_value_info("t0", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info(f"t{FLOOR_NODES}", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds, chain_bytes = {"t0": np.ones(1, np.float32)}, model.SerializeToString()
    model_runs, nodes = _ort_events(chain_bytes, threads, feeds, FLOOR_RUNS, optimization="disabled")
    plain = OrtRunner(chain_bytes, threads=threads, optimization="disabled")
    unprofiled_us = float(np.median(timed_samples(plain, feeds, 10 * FLOOR_RUNS))) * 1e3 / FLOOR_NODES
    return max(_typical_node_us(model_runs, nodes) - unprofiled_us, 0.0)


def _typical_node_us(model_runs: list[dict], nodes: list[dict]) -> float:
    """The median over runs of each run's mean node time.

    The mean within a run keeps the fraction the whole-µs durations round away; the median
    across runs drops the runs a burst of other work slowed down, which, averaged in, made
    the floor larger than a small kernel's own time (a depthwise Conv profiled at 0 µs).
    """
    return float(np.median([np.mean([e["dur"] for e in events]) for events in _by_run(model_runs, nodes) if events]))


def _by_run(model_runs: list[dict], nodes: list[dict]) -> list[list[dict]]:
    """The node events inside each ``model_run`` event (both from :func:`_ort_events`)."""
    starts, grouped = [e["ts"] for e in model_runs], [[] for _ in model_runs]
    for e in nodes:
        grouped[bisect.bisect_right(starts, e["ts"]) - 1].append(e)
    return grouped


def typical_runs(runs: list[ProfiledRun]) -> list[ProfiledRun]:
    """The fifth of the runs around the median wall time (at least one).

    On a shared machine, bursts of other work slow some runs down, and they make the mean
    run slower than the median one. The ops of the runs around the median add up to a run
    comparable with the end-to-end median, and averaging them still counts the gaps between
    ops, which a per-op median would not.
    """
    ordered = sorted(runs, key=lambda r: r.wall_us)
    middle, half = len(ordered) // 2, max(len(ordered) // 10, 0)
    return ordered[max(middle - half, 0):middle + half + 1]


def summarize(profiled: Profiled, median_ms: float) -> dict[str, Any]:
    """Per-inference times by op type and top nodes, and the share no op accounts for."""
    runs = typical_runs(profiled.runs)
    node_us: dict[tuple[str, str], float] = defaultdict(float)
    for run in runs:
        for key, us in run.op_us.items():
            node_us[key] += us
    per_node = sorted(((node, op, us / len(runs) / 1e3) for (node, op), us in node_us.items()), key=lambda n: (-n[2], n[0]))
    total = sum(ms for _, _, ms in per_node)
    by_type: dict[str, list[float]] = defaultdict(list)
    for _, op, ms in per_node:
        by_type[op].append(ms)
    types = sorted(by_type.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    profiled_run_ms = sum(r.wall_us for r in runs) / len(runs) / 1e3
    return {
        "method": profiled.method,
        "runs": len(profiled.runs),
        "typical_runs": len(runs),
        "resolution_us": 1,
        # Profilers report whole microseconds: ops shorter than that can hide up to this much.
        "rounding_bound_ms": len(node_us) / 1e3,
        "total_ms": total,
        "end_to_end_median_ms": median_ms,
        "unaccounted_ms": median_ms - total,
        "unaccounted_share": (median_ms - total) / median_ms if median_ms > 0 else None,
        # The same comparison inside the profiled runs themselves (immune to load changing between sessions).
        "profiled_run_ms": profiled_run_ms,
        "profiled_coverage": total / profiled_run_ms if profiled_run_ms > 0 else None,
        "by_type": [{"op": op, "ms": sum(t), "share": _share(sum(t), total), "nodes": len(t)} for op, t in types],
        "top_nodes": [{"node": node, "op": op, "ms": ms, "share": _share(ms, total)} for node, op, ms in per_node[:TOP_NODES]],
        "note": profiled.note,
    }


def _share(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0
