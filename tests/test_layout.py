"""The channels-last pass on its own: exact (checked in ONNX Runtime through the reference
expansion of channels-last ops) and minimal (transposes counted)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import GraphBuilder, random_feeds, run_ort, save

from edgec import model as edgec_model
from edgec.passes.canonicalize import canonicalize_passes, cleanup_passes
from edgec.passes.decompose import DecomposeBatchNorm
from edgec.passes.layout import (
    CHANNELS_LAST_OPS,
    CL_DOMAIN,
    FUSED_CHANNELS_LAST_OPS,
    LAYOUT_PERM,
    ChannelsLast,
    compose,
    expand_channels_last,
    inverse,
)
from edgec.passes.pipeline import Pipeline


def channels_last(proto, tmp_path):
    model = edgec_model.load(save(proto, tmp_path))
    model, records = Pipeline(canonicalize_passes() + [DecomposeBatchNorm(), ChannelsLast(), *cleanup_passes()])(model)
    return model, next(r for r in records if r.name == "channels-last")


def assert_exact(proto, model, atol=1e-5):
    """The pass's output, run with its inputs/outputs in their stored layouts, equals the source."""
    feeds = random_feeds(proto)
    want = run_ort(proto, feeds)
    perms = {v.name: v.meta.get(LAYOUT_PERM) for v in [*model.graph.inputs, *model.graph.outputs]}
    stored = {k: v.transpose(perms[k]) if perms.get(k) else v for k, v in feeds.items()}
    got = run_ort(edgec_model.to_proto(expand_channels_last(model)), stored)
    for out, expected, actual in zip(model.graph.outputs, want, got):
        if perms.get(out.name):
            actual = actual.transpose(inverse(perms[out.name]))
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=1e-5)


def transposes(model) -> int:
    return sum(1 for n in model.graph if n.op_type == "Transpose")


def conv(g, x, cin, cout, k=3, stride=1, group=1):
    return g.op("Conv", [x, g.weight(cout, cin // group, k, k), g.weight(cout)], pads=[k // 2] * 4, strides=[stride] * 2, group=group)


def test_perm_algebra():
    p = (0, 2, 3, 1)
    assert compose(p, inverse(p)) == (0, 1, 2, 3)
    a = np.arange(24).reshape(1, 2, 3, 4)
    assert np.array_equal(a.transpose(p).transpose((0, 3, 1, 2)), a.transpose(compose(p, (0, 3, 1, 2))))


def _residual(g):
    c1 = g.op("Relu", [conv(g, "x", 3, 8)])
    c2 = conv(g, c1, 8, 8)
    bn = g.op("BatchNormalization", [c2, g.const(np.ones(8, np.float32) * 1.5), g.weight(8), g.weight(8), g.const(np.ones(8, np.float32))])
    flat = g.op("Flatten", [g.op("Relu", [g.op("Add", [bn, c1])])])
    return g.op("Gemm", [flat, g.weight(10, 512), g.weight(10)], transB=1), [1, 10]


def _normalized_input(g):
    scaled = g.op("Add", [g.op("Mul", ["x", g.const(np.array([2.0, 1.0, 0.5], np.float32).reshape(3, 1, 1))]), g.weight(3, 1, 1)])
    return conv(g, scaled, 3, 4), [1, 4, 8, 8]


def _squeeze_excite(g):
    c = conv(g, "x", 3, 8)
    gate = g.op("HardSigmoid", [g.op("Conv", [g.op("GlobalAveragePool", [c]), g.weight(8, 8, 1, 1)])])
    return g.op("Mul", [c, gate]), [1, 8, 8, 8]


def _eca_gate(g):
    """timm's ECA: a 1-D conv across the pooled channels, broadcast back by ``expand_as``."""
    c = conv(g, "x", 3, 8)
    pooled = g.op("Reshape", [g.op("GlobalAveragePool", [c]), g.const(np.array([1, 1, 8], np.int64))])
    mixed = g.op("Sigmoid", [g.op("Conv", [pooled, g.weight(1, 1, 3)], pads=[1, 1])])
    gate = g.op("Reshape", [mixed, g.const(np.array([1, 8, 1, 1], np.int64))])
    gated = g.op("Mul", [c, g.op("Expand", [gate, g.const(np.array([1, 8, 8, 8], np.int64))])])
    return conv(g, gated, 8, 4), [1, 4, 8, 8]


def _tokens_and_back(g):
    """Attention over a feature map (ViT patches, hybrid nets): ``flatten(2).transpose(1, 2)``
    to tokens, a linear layer, and back to a map for the next conv."""
    tokens = g.op("Transpose", [g.op("Reshape", [conv(g, "x", 3, 8), g.const(np.array([1, 8, 64], np.int64))])], perm=[0, 2, 1])
    mapped = g.op("Transpose", [g.op("MatMul", [tokens, g.weight(8, 8)])], perm=[0, 2, 1])
    return conv(g, g.op("Reshape", [mapped, g.const(np.array([1, 8, 8, 8], np.int64))]), 8, 4), [1, 4, 8, 8]


def _radix_split(g):
    """ResNeSt's split attention: the channels split into radix × channels and summed."""
    split = g.op("Reshape", [conv(g, "x", 3, 8), g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    return conv(g, g.op("ReduceSum", [split, g.const(np.array([1], np.int64))], keepdims=0), 4, 4), [1, 4, 8, 8]


def _concat_split_slice(g):
    a, b = conv(g, "x", 3, 4), conv(g, "x", 3, 6)
    cat = g.op("Concat", [a, b], axis=1)
    left, right = g.op("Split", [cat, g.const(np.array([5, 5], np.int64))], n_out=2, axis=1)
    sliced = g.op("Slice", [cat, g.const(np.array([1], np.int64)), g.const(np.array([9], np.int64)), g.const(np.array([1], np.int64))])
    merged = g.op("Concat", [conv(g, left, 5, 4), conv(g, right, 5, 4), conv(g, sliced, 8, 4)], axis=1)
    return merged, [1, 12, 8, 8]


def _softmax_and_reduce(g):
    c = conv(g, "x", 3, 8)
    soft = g.op("Softmax", [c], axis=1)
    return g.op("ReduceMean", [soft], axes=[2, 3], keepdims=0), [1, 8]


def _explicit_pad_and_pool(g):
    padded = g.op("Pad", ["x", g.const(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64))])
    c = g.op("Conv", [padded, g.weight(4, 3, 3, 3)], strides=[2, 2])
    return g.op("MaxPool", [c], kernel_shape=[2, 2], strides=[2, 2]), [1, 4, 2, 2]


def _resize_concat(g):
    c1 = conv(g, "x", 3, 4)
    down = g.op("MaxPool", [c1], kernel_shape=[2, 2], strides=[2, 2])
    up = g.op("Resize", [conv(g, down, 4, 4), "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    return conv(g, g.op("Concat", [up, c1], axis=1), 8, 2, k=1), [1, 2, 8, 8]


def _gather_unsqueeze(g):
    c = conv(g, "x", 3, 8)
    picked = g.op("Gather", [c, g.const(np.array([0, 2, 5], np.int64))], axis=1)
    pooled = g.op("ReduceMax", [picked], axes=[3], keepdims=0)
    return g.op("Unsqueeze", [pooled, g.const(np.array([3], np.int64))]), [1, 3, 8, 1]


def _pooled_matmul(g):
    pooled = g.op("GlobalAveragePool", [conv(g, "x", 3, 8)])
    flat = g.op("Reshape", [pooled, g.const(np.array([1, 8], np.int64))])
    return g.op("MatMul", [flat, g.weight(8, 5)]), [1, 5]


def _flatten_matmul(g):
    flat = g.op("Flatten", [g.op("Relu", [conv(g, "x", 3, 4)])])
    return g.op("MatMul", [flat, g.weight(256, 5)]), [1, 5]


ZERO_TRANSPOSE_PATTERNS = {
    "flatten_matmul": _flatten_matmul,
    "residual_bn_flatten_gemm": _residual,
    "normalized_input": _normalized_input,
    "squeeze_excite": _squeeze_excite,
    "eca_gate": _eca_gate,
    "tokens_and_back": _tokens_and_back,
    "radix_split": _radix_split,
    "concat_split_slice": _concat_split_slice,
    "softmax_channels_reduce": _softmax_and_reduce,
    "explicit_pad_pool": _explicit_pad_and_pool,
    "resize_concat": _resize_concat,
    "gather_unsqueeze": _gather_unsqueeze,
    "pooled_matmul": _pooled_matmul,
}


@pytest.mark.parametrize("pattern", sorted(ZERO_TRANSPOSE_PATTERNS))
def test_conv_patterns_need_no_transpose(pattern, tmp_path):
    g = GraphBuilder()
    y, shape = ZERO_TRANSPOSE_PATTERNS[pattern](g)
    proto = g.model({"x": [1, 3, 8, 8]}, {y: shape})
    model, record = channels_last(proto, tmp_path)
    assert_exact(proto, model)
    assert transposes(model) == 0, record.details
    assert model.graph.inputs[0].meta[LAYOUT_PERM] == (0, 2, 3, 1)
    assert record.details["channels_last_ops"] > 0


def test_conv1d_is_channels_last(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", [g.op("Conv", ["x", g.weight(6, 4, 3)], pads=[1, 1])])
    proto = g.model({"x": [1, 4, 16]}, {y: [1, 6, 16]})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)
    assert transposes(model) == 0
    assert model.graph.inputs[0].meta[LAYOUT_PERM] == (0, 2, 1)


def test_channel_shuffle_stays_exact(tmp_path):
    """Reshape across the channel axis has no layout rule: transposes remain, results exact."""
    g = GraphBuilder()
    c = conv(g, "x", 3, 8)
    grouped = g.op("Reshape", [c, g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    shuffled = g.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    y = conv(g, g.op("Reshape", [shuffled, g.const(np.array([1, 8, 8, 8], np.int64))]), 8, 4)
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)


def test_a_small_gate_follows_the_data_it_scales(tmp_path):
    """SKNet's selective kernel: two branches stacked on a new radix axis, scaled by a softmax
    gate over that axis, summed. The stack stays channels-last; only the gate is transposed."""
    g = GraphBuilder()
    branches = [g.op("Unsqueeze", [conv(g, "x", 3, 8, k=k), g.const(np.array([1], np.int64))]) for k in (1, 3)]
    stacked = g.op("Concat", branches, axis=1)
    pooled = g.op("GlobalAveragePool", [g.op("ReduceSum", [stacked, g.const(np.array([1], np.int64))], keepdims=0)])
    logits = g.op("Reshape", [g.op("Conv", [pooled, g.weight(16, 8, 1, 1)]), g.const(np.array([1, 2, 8, 1, 1], np.int64))])
    scaled = g.op("Mul", [stacked, g.op("Softmax", [logits], axis=1)])
    y = conv(g, g.op("ReduceSum", [scaled, g.const(np.array([1], np.int64))], keepdims=0), 8, 4)
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)
    moved = [int(np.prod([int(d) for d in n.inputs[0].shape.dims])) for n in model.graph if n.op_type == "Transpose"]
    assert moved and max(moved) <= 16, moved


@pytest.mark.parametrize("shape", [[1, 8, 64], [1, 2, 4, 8, 8], [1, 8, 8, 2, 4], [1, 64, 8], [8, 64], [1, 1, 8, 64, 1], [4, 2, 8, 8]])
def test_a_reshape_after_a_conv_stays_exact(shape, tmp_path):
    """Reshapes that keep the transposed axes in groups take the transpose past them; the
    others ([1, 64, 8] mixes channels with rows) keep it in front. Both compute the same."""
    g = GraphBuilder()
    y = g.op("Relu", [g.op("Reshape", [conv(g, "x", 3, 8), g.const(np.array(shape, np.int64))])])
    proto = g.model({"x": [1, 3, 8, 8]}, {y: shape})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)


def test_attention_over_a_feature_map_keeps_its_one_transpose(tmp_path):
    """Visformer's attention: qkv = conv → reshape [1, 3, heads, d, HW] → permute → q, k, v.
    Pushed past the Reshape, the conv's transpose would merge with the permute and then be
    split three ways in front of the MatMuls (heads and tokens swapped: not foldable)."""
    g = GraphBuilder()
    qkv = g.op("Reshape", [conv(g, "x", 3, 24, k=1), g.const(np.array([1, 3, 2, 4, 64], np.int64))])
    heads = g.op("Transpose", [qkv], perm=[1, 0, 2, 4, 3])
    q, k, v = (g.op("Squeeze", [part, g.const(np.array([0], np.int64))])
               for part in g.op("Split", [heads, g.const(np.array([1, 1, 1], np.int64))], n_out=3, axis=0))
    scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    y = g.op("MatMul", [scores, v])
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 2, 64, 4]})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)
    costly = [n for n in model.graph if n.op_type == "Transpose"
              and tuple(n.attributes["perm"].value) != (0, 1, 3, 2)]  # the k transpose folds into BATCH_MATMUL
    assert len(costly) <= 2, [n.attributes["perm"].value for n in costly]


def test_op_without_layout_rule_is_wrapped_not_converted(tmp_path):
    g = GraphBuilder()
    c = conv(g, "x", 3, 4)
    normed = g.op("InstanceNormalization", [c, g.const(np.ones(4, np.float32)), g.const(np.zeros(4, np.float32))])
    y = conv(g, normed, 4, 4)
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})
    model, _ = channels_last(proto, tmp_path)
    assert_exact(proto, model)
    node = next(n for n in model.graph if n.op_type == "InstanceNormalization")
    assert node.inputs[0].producer().op_type == "Transpose"  # it still sees NCHW


def test_tokens_without_convs_are_untouched(tmp_path):
    g = GraphBuilder()
    y = g.op("LayerNormalization", [g.op("MatMul", ["x", g.weight(16, 16)]), g.const(np.ones(16, np.float32))], axis=-1)
    proto = g.model({"x": [1, 8, 16]}, {y: [1, 8, 16]})
    model, record = channels_last(proto, tmp_path)
    assert record.details["channels_last_ops"] == 0 and not record.modified
    assert LAYOUT_PERM not in model.graph.inputs[0].meta


def test_four_dimensional_output_is_stored_channels_last(tmp_path):
    g = GraphBuilder()
    y = conv(g, "x", 3, 4)
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})
    model, record = channels_last(proto, tmp_path)
    assert record.details["io_perms"] == {"x": [0, 2, 3, 1], y: [0, 2, 3, 1]}
    assert [int(d) for d in model.graph.outputs[0].shape.dims] == [1, 8, 8, 4]
    assert model.graph.outputs[0].name == y


def test_every_channels_last_op_has_a_tflite_rule():
    from edgec.lower.tflite.registry import lookup

    missing = [op for op in [*CHANNELS_LAST_OPS, *FUSED_CHANNELS_LAST_OPS] if lookup(CL_DOMAIN, op) is None]
    assert missing == []
