"""int8 TFLite of PReLU: a slope shared by every channel runs as XNNPACK's int8 LEAKY_RELU;
per-channel slopes stay float PRELU inside the one XNNPACK partition (every int8 form of
them measured costs more instructions)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import GraphBuilder, save

from edgec.build import BuildOptions, build
from edgec.lower.tflite.convert import op_histogram


def conv_prelu_conv(slope: np.ndarray):
    g = GraphBuilder()
    x = g.op("Conv", ["x", g.weight(8, 3, 3, 3), g.weight(8)], pads=[1] * 4)
    y = g.op("PRelu", [x, g.const(slope.astype(np.float32))])
    y = g.op("Conv", [y, g.weight(8, 8, 3, 3), g.weight(8)], pads=[1] * 4)
    return g.model({"x": [1, 3, 16, 16]}, {y: [1, 8, 16, 16]})


def build_int8(proto, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32))
    options = BuildOptions(precision="int8", calib=str(calib), min_cosine=0.0, speed_check=False)
    return build(save(proto, tmp_path), "tflite-arm", tmp_path / "out", options)


@pytest.mark.parametrize("shape", [(1,), (8, 1, 1)])
def test_shared_slope_prelu_runs_as_int8_leaky_relu_in_one_partition(shape, tmp_path):
    result = build_int8(conv_prelu_conv(np.full(shape, -0.3)), tmp_path)
    lowering = result.report["lowering"]
    ops = op_histogram(result.artifacts[0].read_bytes())
    assert "PRELU" not in ops and ops["LEAKY_RELU"] == 1 and lowering["prelu_as_leaky_relu"] == 1
    assert not lowering["float_ops"] and lowering["kept_float_for_xnnpack"] == []
    assert lowering["placement"] == {"delegate_partitions": 1, "outside_delegate": {}}
    assert result.verification.outputs[0].cosine >= 0.999


def test_per_channel_prelu_stays_float_inside_the_partition(tmp_path):
    result = build_int8(conv_prelu_conv(np.linspace(-0.5, 1.5, 8).reshape(8, 1, 1)), tmp_path)
    lowering = result.report["lowering"]
    assert lowering["float_ops"] == {"PRELU": 1} and lowering["prelu_as_leaky_relu"] == 0
    assert lowering["placement"] == {"delegate_partitions": 1, "outside_delegate": {}}
    assert result.verification.outputs[0].cosine >= 0.999
