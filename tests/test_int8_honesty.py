"""int8 builds say what they got and check it on real data: the share of MACs run in int8
and the float layers, a warning when most stay float, verification on calibration samples
held back when no --inputs are given, and a precision search whose kept steps only ever
raise the accuracy."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from helpers import GraphBuilder, save

from edgec.build import BuildOptions, build
from edgec.stages.data import held_out_split
from edgec.errors import EdgecWarning, VerificationError
from edgec.verify import InputSet


def conv(g: GraphBuilder, x: str, cin: int, cout: int, scale: float, k: int = 3) -> str:
    w = (g.rng.standard_normal((cout, cin, k, k)) * scale / np.sqrt(cin * k * k)).astype(np.float32)
    b = (g.rng.standard_normal(cout) * 0.1 * scale).astype(np.float32)
    return g.op("Conv", [x, g.const(w), g.const(b)], pads=[k // 2] * 4)


def head(g: GraphBuilder, x: str, channels: int) -> str:
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = (g.rng.standard_normal((10, channels)) / np.sqrt(channels)).astype(np.float32)
    return g.op("Gemm", [pooled, g.const(w), g.const(np.zeros(10, np.float32))], transB=1)


def densenet(layers: int = 6, growth: int = 4) -> onnx.ModelProto:
    """A DenseNet-style chain: each layer reads the concatenation of all before it. Layer
    scales differ 20000× (0.01, 1, 200), so one int8 scale per concatenation, as TFLite
    gives it, crushes the small branches: all-int8 TFLite reaches cosine ~0.42 (ORT, which
    quantizes each input apart, 0.99999)."""
    g = GraphBuilder(seed=0)
    feats, channels = g.op("Relu", [conv(g, "x", 3, 8, 1.0)]), 8
    for i in range(layers):
        new = g.op("Relu", [conv(g, feats, channels, growth, (0.01, 1.0, 200.0)[i % 3])])
        feats, channels = g.op("Concat", [feats, new], axis=1), channels + growth
    return g.model({"x": [1, 3, 16, 16]}, {head(g, feats, channels): [1, 10]})


def squeeze_excite() -> onnx.ModelProto:
    """MobileNetV3-style: conv → HardSwish → squeeze-excite (pool, conv, Relu, conv,
    HardSigmoid, Mul) → head, calibrated on images in [0, 1]."""
    g = GraphBuilder(seed=2)
    x = g.op("HardSwish", [conv(g, "x", 3, 16, 2.0)])
    squeezed = g.op("Relu", [conv(g, g.op("GlobalAveragePool", [x]), 16, 4, 1.0, k=1)])
    x = g.op("Mul", [x, g.op("HardSigmoid", [conv(g, squeezed, 4, 16, 1.0, k=1)])])
    x = g.op("HardSwish", [conv(g, x, 16, 16, 2.0)])
    return g.model({"x": [1, 3, 16, 16]}, {head(g, x, 16): [1, 10]})


def _images(tmp_path, name: str, count: int, seed: int) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=np.random.default_rng(seed).uniform(0, 1, (count, 3, 16, 16)).astype(np.float32))
    return str(path)


def test_held_out_split_is_seeded_and_keeps_labels():
    samples = InputSet([{"x": np.full((2, 1), i, np.float32)} for i in range(8)], "file c.npz (8 batches)", np.arange(16))
    calibration, held = held_out_split(samples, seed=3)
    assert held.source == "held-out calibration samples (2 of file c.npz (8 batches), seed 3)"
    held_ids = [int(b["x"][0, 0]) for b in held.batches]
    assert sorted(held_ids + [int(b["x"][0, 0]) for b in calibration.batches]) == list(range(8))
    assert list(held.labels) == [label for i in held_ids for label in (2 * i, 2 * i + 1)]
    assert [int(b["x"][0, 0]) for b in held_out_split(samples, seed=3)[1].batches] == held_ids


def test_calibration_data_verifies_where_random_noise_would_fail(tmp_path):
    """With --calib and no --inputs the artifact is verified on held-out calibration samples;
    the same artifact checked on N(0, 1) noise, far outside the calibrated ranges, fails."""
    path = save(squeeze_excite(), tmp_path)
    calib = _images(tmp_path, "calib", 16, seed=0)
    options = BuildOptions(precision="int8", calib=calib, speed_check=False)
    result = build(path, "ort-arm", tmp_path / "out", options)
    assert result.report["verification"]["inputs"]["source"].startswith("held-out calibration samples (4 of")
    assert result.report["calibration"]["batches"] == 12 and result.verification.passed
    noise = tmp_path / "noise.npz"
    np.savez(noise, x=np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32))
    with pytest.raises(VerificationError, match="cosine") as failure:
        build(path, "ort-arm", tmp_path / "noise-out", BuildOptions(precision="int8", calib=calib, inputs=str(noise), speed_check=False))
    assert "calibrate on samples like the verification inputs" in failure.value.hint


def test_densenet_search_only_keeps_steps_that_help_and_reports_float_macs(tmp_path):
    path = save(densenet(), tmp_path)
    options = BuildOptions(precision="int8", calib=_images(tmp_path, "calib", 24, seed=3), speed_check=False)
    with warnings.catch_warnings(record=True) as caught:  # the mostly-float warning, if the fraction calls for it
        warnings.simplefilter("always", EdgecWarning)
        result = build(path, "tflite-x86", tmp_path / "out", options)
    steps = result.report["lowering"]["search"]
    assert not steps[0]["passed"], "all-int8 must miss the goal for this test to mean anything"
    taken = [min(s["cosine"].values()) for s in [steps[0], *(s for s in steps if s.get("taken"))]]
    passing = [min(s["cosine"].values()) for s in steps if s["passed"]]
    assert taken == sorted(taken) and passing and min(passing) > taken[-1], steps
    int8 = result.report["int8"]
    built = int8["int8_artifact"]
    assert int8["shipped"] == "int8" and int8["int8_macs_fraction"] == built["int8_macs_fraction"]
    assert built["int8_macs"] + sum(layer["macs"] for layer in built["float_layers"]) == built["macs"]
    assert {layer["why"] for layer in built["float_layers"]} <= {"precision search", "not quantized"}
    mostly_float = [str(w.message) for w in caught if "MACs in int8" in str(w.message)]
    assert bool(mostly_float) == (built["int8_macs_fraction"] < 0.5) and ("warning" in int8) == bool(mostly_float)
