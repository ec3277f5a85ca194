"""AdaRound: learned rounding beats nearest rounding on a layer's outputs, on the backends' grid."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import GraphBuilder

from edgec.graph import constant
from edgec.passes.adaround import AdaRound, adaround
from edgec.weights import quantize_dequantize, weight_view


def test_learned_rounding_lowers_output_error_of_a_conv():
    rng = np.random.default_rng(0)
    view = rng.standard_normal((1, 8, 6, 9))  # 8 outputs, 6 inputs, 3x3 taps
    mix = rng.standard_normal((54, 54)) + 1.0  # correlated inputs, where nearest rounding is far from best
    rows = (rng.standard_normal((512, 54)) @ mix).reshape(512, 1, 6, 9)
    rounded, (nearest, learned) = adaround(view, rows, qmax=7, iterations=300, weight=1.0, rng=rng)
    assert learned < 0.6 * nearest
    steps = rounded / (np.abs(rounded).max(axis=(2, 3), keepdims=True) / 7)
    assert np.allclose(steps, np.rint(steps))  # on the grid the quantizers recompute
    assert np.allclose(quantize_dequantize(rounded, 7), rounded)  # ...and they reproduce it exactly


def test_pass_snaps_conv_weights_to_the_int8_grid():
    g = GraphBuilder(seed=2)
    y = g.op("Conv", ["x", g.weight(4, 3, 3, 3), g.weight(4)], pads=[1, 1, 1, 1], strides=[2, 2])
    model = ir.serde.deserialize_model(g.model({"x": (1, 3, 8, 8)}, {y: None}))
    samples = [{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32)} for i in range(4)]
    result = AdaRound(samples, weight_qmax=127, iterations=50)(model)
    conv = next(iter(result.model.graph))
    view = weight_view(conv, constant(conv.inputs[1]).astype(np.float64))
    assert np.allclose(quantize_dequantize(view, 127), view, atol=1e-6)
    nearest, learned = result.details["mse"][conv.name]
    assert learned <= nearest


def test_fitting_rows_reproduce_the_convolution(monkeypatch):
    """The im2col rows times the weights are the Conv's output, whatever its pads, strides,
    dilations and groups."""
    import onnxruntime as ort

    from edgec.passes import adaround as module

    g = GraphBuilder(seed=3)
    y = g.op("Conv", ["x", g.weight(6, 2, 3, 3)], pads=[1, 0, 1, 2], strides=[2, 1], dilations=[1, 2], group=2)
    proto = g.model({"x": (2, 4, 9, 9)}, {y: None})
    x = np.random.default_rng(0).standard_normal((2, 4, 9, 9)).astype(np.float32)
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": x})[0]
    conv = next(iter(ir.serde.deserialize_model(proto).graph))
    monkeypatch.setattr(module, "ROWS", 10**6)  # every row, in order
    rows = module._rows(conv, x, np.random.default_rng(0))
    got = module._outputs(rows, weight_view(conv, constant(conv.inputs[1]).astype(np.float64)))
    assert np.allclose(got.reshape(len(rows), -1), expected.transpose(0, 2, 3, 1).reshape(-1, 6), atol=1e-5)
