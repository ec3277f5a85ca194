"""Where an int8 artifact spends its time compared with its fp32 twin, kernel by kernel.

The runtimes name the same work differently per precision (ONNX Runtime: ``Conv`` or
``FusedConv`` vs ``QLinearConv``; XNNPACK: ``Convolution (NHWC, F32) IGEMM`` vs
``Convolution (NHWC, QC8) IGEMM``), so every profiled op is first reduced to its kernel
family. Comparing the families answers what a speed check alone cannot: which int8
kernels are slower than their float versions on this CPU (on x86 without VNNI: ORT's
depthwise convolutions and XNNPACK's int8 convolutions), and what the conversions between
int8 and float cost.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgec.profile.ops import profile_artifact, typical_runs
from edgec.runtime import open_runner
from edgec.verify import random_inputs

_DATATYPES = re.compile(r"\s*\([^)]*\)")  # XNNPACK: "Convolution (NHWC, QC8) IGEMM" → "Convolution IGEMM"
_ORT_FAMILIES = {"FusedConv": "Conv", "Upsample": "Resize", "QGemm": "Gemm", "FusedGemm": "Gemm", "MatMulInteger": "MatMul", "FusedMatMul": "MatMul"}
_ORT_PREFIXES = ("QLinear", "Nhwc")
CONVOLUTIONS = ("Conv", "QLinearConv", "FusedConv")


def kernel_family(op: str, conv_kind: str | None = None) -> str:
    """The precision-independent name of a profiled op ("Conv (depthwise)", "Convolution IGEMM")."""
    family = _ORT_FAMILIES.get(op, op)
    for prefix in _ORT_PREFIXES:
        family = family.removeprefix(prefix)
    family = _DATATYPES.sub("", family)
    return f"{family} ({conv_kind})" if conv_kind else family


def kernel_times(path: Path, threads: int, runs: int = 20, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """Milliseconds per inference by kernel family (on ``feeds``, or random data); empty where
    the runtime cannot profile ops."""
    if feeds is None:
        feeds = random_inputs(open_runner(path, threads=threads).inputs, count=1).batches[0]
    profiled = profile_artifact(path, threads, dict(feeds), runs)
    if isinstance(profiled, str):
        return {}
    kinds = conv_kinds(path)
    runs_ = typical_runs(profiled.runs)
    times: dict[str, float] = defaultdict(float)
    for run in runs_:
        for (node, op), us in run.op_us.items():
            times[kernel_family(op, kinds.get(node))] += us / len(runs_) / 1e3
    return dict(times)


def conv_kinds(path: Path) -> dict[str, str]:
    """Grouped and depthwise convolutions of an ONNX artifact by node name (their kernels differ
    from dense ones); empty for other formats, whose profilers name those kernels themselves."""
    if path.suffix != ".onnx":
        return {}
    graph = onnx.load(path).graph
    weights = {i.name: i.dims for i in graph.initializer}
    kinds = {}
    for node in graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type in CONVOLUTIONS and group > 1:
            weight = weights.get(node.input[3 if node.op_type == "QLinearConv" else 1])
            kinds[node.name] = "depthwise" if weight is not None and weight[1] == 1 else "grouped"
    return kinds


def compare_kernels(fp32: Path, int8: Path, threads: int, runs: int = 20,
                    feeds: Mapping[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Each kernel family's time in both artifacts (``runs`` profiled runs each, on ``feeds``
    or random data), the families int8 loses most on first."""
    before, after = kernel_times(fp32, threads, runs, feeds), kernel_times(int8, threads, runs, feeds)
    rows = [{"kernel": k, "fp32_ms": round(before.get(k, 0.0), 4), "int8_ms": round(after.get(k, 0.0), 4)}
            for k in sorted(before.keys() | after.keys())]
    return sorted(rows, key=lambda r: (r["fp32_ms"] - r["int8_ms"], r["kernel"]))


def int8_losses(rows: list[dict[str, Any]], count: int = 3) -> list[dict[str, Any]]:
    """The first ``count`` rows of :func:`compare_kernels` that take longer in int8."""
    return [r for r in rows if r["int8_ms"] > r["fp32_ms"]][:count]


def slower_in_int8(rows: list[dict[str, Any]], count: int = 3) -> str:
    """:func:`int8_losses` as a sentence fragment."""
    return ", ".join(f"{r['kernel']} {r['int8_ms']:.3g} ms (fp32 {r['fp32_ms']:.3g} ms)" for r in int8_losses(rows, count))
