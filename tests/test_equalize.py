"""Cross-layer equalization: same function, balanced channel ranges, on built graphs and the zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import GraphBuilder, random_feeds, run_ort

from edgec import model as edgec_model
from edgec.build import canonicalize
from edgec.graph import constant
from edgec.passes.equalize import ActivationEqualization, CrossLayerEqualization

REPO = Path(__file__).resolve().parent.parent


def unbalanced(g: GraphBuilder, *shape: int, axis: int = 0) -> str:
    """A weight whose channels along ``axis`` span four decades of scale."""
    scales = 10 ** g.rng.uniform(-2, 2, shape[axis])
    weight = g.rng.standard_normal(shape) * np.expand_dims(scales, [a for a in range(len(shape)) if a != axis])
    return g.const(weight.astype(np.float32))


def conv_relu_conv(g):
    x = g.op("Conv", ["x", unbalanced(g, 8, 3, 3, 3), g.weight(8)], name="a", pads=[1, 1, 1, 1])
    return g.op("Conv", [g.op("Relu", [x]), unbalanced(g, 6, 8, 3, 3, axis=1), g.weight(6)], name="b"), [["a", "b"]]


def conv_prelu_conv(g):
    x = g.op("Conv", ["x", unbalanced(g, 8, 3, 1, 1)], name="a")
    slope = g.const(g.rng.uniform(0.05, 0.3, (8, 1, 1)).astype(np.float32))
    return g.op("Conv", [g.op("PRelu", [x, slope]), unbalanced(g, 6, 8, 1, 1, axis=1), g.weight(6)], name="b"), [["a", "b"]]


def conv_depthwise_conv(g):
    x = g.op("Conv", ["x", unbalanced(g, 8, 3, 1, 1), g.weight(8)], name="a")
    x = g.op("Conv", [x, unbalanced(g, 8, 1, 3, 3), g.weight(8)], name="dw", group=8, pads=[1, 1, 1, 1])
    x = g.op("Conv", [g.op("Relu", [x]), unbalanced(g, 6, 8, 1, 1, axis=1)], name="b")
    return x, [["a", "dw"], ["dw", "b"]]


def grouped_leaky_relu(g):
    x = g.op("Conv", ["x", unbalanced(g, 8, 3, 3, 3), g.weight(8)], name="a")
    x = g.op("Conv", [g.op("LeakyRelu", [x], alpha=0.1), unbalanced(g, 6, 4, 1, 1, axis=1)], name="b", group=2)
    return x, [["a", "b"]]


def gemm_relu_gemm(g):
    x = g.op("Flatten", ["x"])
    x = g.op("Gemm", [x, unbalanced(g, 16, 192), g.weight(16)], name="a", transB=1, beta=0.5)
    return g.op("Gemm", [g.op("Relu", [x]), unbalanced(g, 16, 5, axis=0), g.weight(1, 5)], name="b", alpha=2.0), [["a", "b"]]


@pytest.mark.parametrize("build", [conv_relu_conv, conv_prelu_conv, conv_depthwise_conv, grouped_leaky_relu, gemm_relu_gemm])
def test_equalization_keeps_function_and_balances_ranges(build):
    g = GraphBuilder(seed=3)
    y, pairs = build(g)
    proto = g.model({"x": [2, 3, 8, 8]}, {y: None})
    model = ir.serde.deserialize_model(proto)
    result = CrossLayerEqualization()(model)
    edgec_model.check(result.model)
    details = result.details
    assert details["pairs"] == pairs
    assert details["range_spread_after"] < details["range_spread_before"] / 3
    feeds = random_feeds(proto)
    want, got = run_ort(proto, feeds)[0], run_ort(edgec_model.to_proto(result.model), feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_depthwise_chain_reaches_three_layer_solution():
    """conv → dw → conv ends with all three per-channel ranges equal (AIMET's cube-root form)."""
    g = GraphBuilder(seed=5)
    y, _ = conv_depthwise_conv(g)
    model = ir.serde.deserialize_model(g.model({"x": [1, 3, 8, 8]}, {y: None}))
    assert CrossLayerEqualization()(model).details["converged"]
    a, dw, b = (constant(n.inputs[1]) for n in model.graph if n.op_type == "Conv")
    ranges = [np.abs(a).max(axis=(1, 2, 3)), np.abs(dw).max(axis=(1, 2, 3)), np.abs(b).max(axis=(0, 2, 3))]
    np.testing.assert_allclose(ranges[0], ranges[1], rtol=1e-3)
    np.testing.assert_allclose(ranges[1], ranges[2], rtol=1e-3)


def test_layers_that_cannot_be_rescaled_are_left_alone():
    g = GraphBuilder(seed=1)
    shared = g.weight(4, 4, 1, 1)
    a = g.op("Conv", ["x", unbalanced(g, 4, 3, 1, 1)], name="a")
    branch = g.op("Conv", [a, shared], name="branch")  # a's output is read twice
    twice = g.op("Add", [a, branch])
    sig = g.op("Conv", [g.op("Sigmoid", [g.op("Conv", [twice, unbalanced(g, 4, 4, 1, 1)])]), g.weight(4, 4, 1, 1)])
    y = g.op("Conv", [sig, shared])  # a weight another layer also uses
    proto = g.model({"x": [1, 3, 4, 4]}, {y: None})
    result = CrossLayerEqualization()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert result.details["pairs"] == [] and result.details["iterations"] == 0


@pytest.mark.parametrize("relu6_to_relu", [False, True])
def test_relu6_is_replaced_only_when_asked(relu6_to_relu):
    g = GraphBuilder(seed=2)
    x = g.op("Conv", ["x", unbalanced(g, 8, 3, 1, 1)], name="a")
    x = g.op("Clip", [x, g.const(np.float32(0)), g.const(np.float32(6))], name="relu6")
    y = g.op("Conv", [x, unbalanced(g, 6, 8, 1, 1)], name="b")
    model = ir.serde.deserialize_model(g.model({"x": [1, 3, 4, 4]}, {y: None}))
    details = CrossLayerEqualization(relu6_to_relu=relu6_to_relu)(model).details
    ops = [n.op_type for n in model.graph]
    if relu6_to_relu:
        assert details["pairs"] == [["a", "b"]] and details["replaced_clips"] == ["relu6"]
        assert ops == ["Conv", "Relu", "Conv"] and len(model.graph.initializers) == 2  # the bounds are gone
    else:
        assert details["pairs"] == [] and details["replaced_clips"] == [] and "Clip" in ops


@pytest.fixture(scope="module")
def digits():
    data = np.load(REPO / "models/data/digits_eval_nchw.npz")
    return REPO / "models/mobilenetv2.onnx", data["image"], data["label"]


def logits(model: ir.Model, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(edgec_model.to_bytes(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"image": image[None]})[0] for image in images])


def test_mobilenetv2_with_relu6_is_unchanged(digits):
    path, images, _ = digits
    model, _ = canonicalize(edgec_model.load(path), {})
    want = logits(model, images[:100])
    details = CrossLayerEqualization()(model).details
    # Every link but the last projection → 1×1 conv goes through ReLU6 or into a residual Add.
    assert len(details["pairs"]) == 1 and details["replaced_clips"] == []
    got = logits(model, images[:100])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mobilenetv2_relu6_to_relu_equalizes_and_keeps_accuracy(digits):
    path, images, labels = digits
    model, _ = canonicalize(edgec_model.load(path), {})
    before = (logits(model, images).argmax(1) == labels).mean()
    details = CrossLayerEqualization(relu6_to_relu=True)(model).details
    assert len(details["pairs"]) >= 10 and len(details["replaced_clips"]) == 11
    assert details["range_spread_after"] < details["range_spread_before"]
    assert "Clip" in [n.op_type for n in model.graph]  # the last ReLU6 feeds pooling, not a layer
    after = (logits(model, images).argmax(1) == labels).mean()
    assert abs(after - before) <= 0.01


def outlier_channel(g: GraphBuilder, consumer_group: int):
    """conv (channel 2's bias −300: an activation range the other channels never reach) →
    Relu → a depthwise or ordinary conv."""
    bias = np.zeros(8, np.float32)
    bias[2] = 300.0
    x = g.op("Conv", ["x", g.weight(8, 3, 1, 1), g.const(bias)], name="a")
    weight = g.weight(8, 1, 3, 3) if consumer_group == 8 else g.weight(6, 8, 1, 1)
    return g.op("Conv", [g.op("Relu", [x]), weight], name="b", group=consumer_group, pads=[1, 1, 1, 1] if consumer_group == 8 else [0, 0, 0, 0])


@pytest.mark.parametrize("group", [8, 1])
def test_activation_equalization_shrinks_the_outlier_channel_exactly(group):
    g = GraphBuilder(seed=2)
    proto = g.model({"x": [1, 3, 6, 6]}, {outlier_channel(g, group): None})
    feeds = [random_feeds(proto, seed=i) for i in range(3)]
    result = ActivationEqualization(feeds)(ir.serde.deserialize_model(proto))
    edgec_model.check(result.model)
    before, after = result.details["range_before_after"]["a"]
    assert before > 250 and after < before / (20 if group == 8 else 4)  # depthwise: down to the typical channel
    for feed in feeds:
        want, got = run_ort(proto, feed)[0], run_ort(edgec_model.to_proto(result.model), feed)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_activation_equalization_leaves_balanced_channels_alone():
    g = GraphBuilder(seed=4)
    x = g.op("Conv", ["x", g.weight(8, 3, 1, 1)], name="a")
    proto = g.model({"x": [1, 3, 4, 4]}, {g.op("Conv", [g.op("Sigmoid", [x]), g.weight(4, 8, 1, 1)]): None})
    result = ActivationEqualization([random_feeds(proto)])(ir.serde.deserialize_model(proto))
    assert not result.modified and result.details["links"] == 0  # Sigmoid is not scale-equivariant
