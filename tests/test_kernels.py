"""Kernel-by-kernel comparison of an int8 artifact with its fp32 twin (why int8 is slower
on a CPU), and the speed check that names those kernels when it ships fp32."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import GraphBuilder, save

import edgec.stages.speed
from edgec.build import BuildOptions, build
from edgec.errors import EdgecWarning, VerificationError
from edgec.lower import LowerOptions, lower
from edgec.model import load
from edgec.profile.kernels import compare_kernels, kernel_family, slower_in_int8
from edgec.runtime import TensorSpec
from edgec.targets import load_target
from edgec.verify import random_inputs


@pytest.mark.parametrize(("op", "kind", "family"), [
    ("Conv", None, "Conv"),
    ("FusedConv", None, "Conv"),
    ("QLinearConv", "depthwise", "Conv (depthwise)"),
    ("QGemm", None, "Gemm"),
    ("NhwcMaxPool", None, "MaxPool"),
    ("QLinearAdd", None, "Add"),
    ("QuantizeLinear", None, "QuantizeLinear"),
    ("Convolution (NHWC, F32) IGEMM", None, "Convolution IGEMM"),
    ("Convolution (NHWC, QC8) IGEMM", None, "Convolution IGEMM"),
    ("Fully Connected (NC, QS8, QC8W) GEMM", None, "Fully Connected GEMM"),
])
def test_each_precision_names_a_kernel_the_same_way(op, kind, family):
    assert kernel_family(op, kind) == family


def mobile_block(tmp_path):
    """conv → relu → depthwise conv → relu → 1x1 conv: a dense and a depthwise kernel."""
    g = GraphBuilder(seed=2)
    zeros = g.const(np.zeros(16, np.float32))
    y = g.op("Relu", [g.op("Conv", ["x", g.weight(16, 3, 3, 3), zeros], pads=[1, 1, 1, 1])])
    y = g.op("Relu", [g.op("Conv", [y, g.weight(16, 1, 3, 3), zeros], pads=[1, 1, 1, 1], group=16)])
    y = g.op("Conv", [y, g.weight(8, 16, 1, 1), g.const(np.zeros(8, np.float32))])
    return save(g.model({"x": [1, 3, 32, 32]}, {y: [1, 8, 32, 32]}), tmp_path)


def test_int8_and_fp32_kernels_are_compared_family_by_family(tmp_path):
    model, target = load(mobile_block(tmp_path)), load_target("ort-x86")
    calibration = random_inputs([TensorSpec("x", (1, 3, 32, 32), np.dtype(np.float32))], seed=1, count=4)
    paths = {}
    for precision, options in (("fp32", LowerOptions("fp32")),
                               ("int8", LowerOptions("int8", calibration, scheme=target.quantize, goal=None))):
        lowered = lower(model.clone(), target, "m", options)
        paths[precision] = tmp_path / precision / lowered.primary
        paths[precision].parent.mkdir()
        paths[precision].write_bytes(lowered.files[lowered.primary])
    rows = {r["kernel"]: r for r in compare_kernels(paths["fp32"], paths["int8"], threads=1)}
    assert rows["Conv (depthwise)"]["fp32_ms"] > 0 and rows["Conv (depthwise)"]["int8_ms"] > 0, rows
    assert rows["Conv"]["fp32_ms"] > 0 and rows["Conv"]["int8_ms"] > 0, rows
    assert rows["QuantizeLinear"]["fp32_ms"] == 0 and rows["QuantizeLinear"]["int8_ms"] > 0, rows


def test_slower_kernels_are_listed_worst_first():
    rows = [{"kernel": "PRelu", "fp32_ms": 0.1, "int8_ms": 0.6}, {"kernel": "Conv", "fp32_ms": 0.5, "int8_ms": 0.4}]
    assert slower_in_int8(rows) == "PRelu 0.6 ms (fp32 0.1 ms)"


def _int8_slower(runners, *timing):
    return {"fp32": {"best_median_ms": 1.0}, "int8": {"best_median_ms": 2.0}}


def _int8_options(**more) -> BuildOptions:
    samples = random_inputs([TensorSpec("x", (1, 3, 32, 32), np.dtype(np.float32))], seed=1, count=4).batches
    return BuildOptions(precision="int8", min_cosine=0.0, calib=lambda: samples, **more)


def test_speed_check_that_ships_fp32_names_the_slower_kernels(tmp_path, monkeypatch):
    """Only the verdict is forced (this host may well run int8 faster); the kernels are profiled for real."""
    monkeypatch.setattr(edgec.stages.speed, "compare_latency", _int8_slower)
    with pytest.warns(EdgecWarning, match=r"slower in int8: .+ ms \(fp32 .+ ms\)"):
        result = build(mobile_block(tmp_path), "ort-x86", tmp_path / "out", _int8_options())
    decision = result.report["speed_check"]
    assert decision["shipped"] == "fp32" == result.report["precision"]
    assert {"Conv", "Conv (depthwise)", "QuantizeLinear"} <= {r["kernel"] for r in decision["kernels"]}


def test_fp32_shipped_by_the_speed_check_that_fails_verification_says_why(tmp_path, monkeypatch):
    """fp32 is held to the fp32 criterion; the error says the speed check chose it."""
    monkeypatch.setattr(edgec.stages.speed, "compare_latency", _int8_slower)
    with pytest.warns(EdgecWarning), pytest.raises(VerificationError, match="speed check built fp32.+--no-speed-check"):
        build(mobile_block(tmp_path), "tflite-x86", tmp_path / "out", _int8_options(tolerance=1e-12))
    assert not (tmp_path / "out").exists()
