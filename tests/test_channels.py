"""Channel dependency graph and structured pruning on small graphs built for each coupling.

The oracle for every coupling: the original graph with the removed channels' *input*
weights zeroed in every layer that reads them computes exactly what the pruned graph does.
A missed coupling gives a shape error or a different output; a wrong offset a different one.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, random_feeds, run_ort

from edgec.analysis import layer_table
from edgec.errors import EdgecWarning, RecipeError
from edgec.graph import attr
from edgec.model import to_proto
from edgec.passes.channel_pruning import ChannelPruning, ChannelPruningOptions, channel_groups
from edgec.passes.channels import ChannelGraph
from edgec.recipe import Step, make_passes
from edgec.verify import InputSet

X = "x"


def _input_axis(node: ir.Node) -> int | None:
    if node.op_type == "Conv" and attr(node, "group", 1) == 1:
        return 1
    if node.op_type == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return 0 if node.op_type in ("MatMul", "ConvTranspose") else None


def prune_some(proto: onnx.ModelProto, fraction: float = 0.5) -> tuple[onnx.ModelProto, list]:
    """Remove the first ``fraction`` of every prunable group's channels; check the pruned
    graph against the zeroed original; return the pruned model and the groups."""
    model = ir.serde.deserialize_model(proto)
    graph = ChannelGraph(model.graph)
    groups = channel_groups(graph)
    removed = {c for g in groups for c in g.classes[: max(1, int(len(g.classes) * fraction))] if g.classes}
    removed = graph.spare_emptied(removed, priority=lambda c: c)
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(proto)
    weights = {t.name: t for t in zeroed.graph.initializer}
    for node in model.graph:
        axis, keep = _input_axis(node), graph.keep(node.inputs[0], removed)
        if axis is not None and keep is not None:
            tensor = weights[node.inputs[1].name]
            array = onnx.numpy_helper.to_array(tensor).copy()
            shape = [1] * array.ndim
            shape[axis] = -1
            tensor.CopyFrom(onnx.numpy_helper.from_array(array * keep.reshape(shape), tensor.name))
    graph.apply(removed)
    pruned = to_proto(model)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(proto)
    for want, got in zip(run_ort(zeroed, feeds), run_ort(pruned, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return pruned, groups


def shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}


def conv(b: GraphBuilder, x: str, cin: int, cout: int, k: int = 3, group: int = 1, **attrs) -> str:
    w = b.weight(cout, cin // group, k, k)
    return b.op("Conv", [x, w, b.weight(cout)], pads=[k // 2] * 4, group=group, **attrs)


def test_conv_chain_removes_outputs_then_inputs():
    b = GraphBuilder()
    h = b.op("Relu", [conv(b, X, 3, 8)])
    out = conv(b, h, 8, 4)
    pruned, groups = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert [len(g.classes) for g in groups] == [8, 0]  # the last conv feeds the output: frozen
    assert groups[1].reasons == ["reaches a graph output"]
    assert shapes(pruned)[h] == [1, 4, 8, 8]


def test_depthwise_conv_follows_its_producer():
    b = GraphBuilder()
    h = conv(b, X, 3, 8, k=1)
    d = b.op("Relu", [conv(b, h, 8, 8, group=8)])
    out = conv(b, d, 8, 4, k=1)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[d] == [1, 4, 8, 8]
    dw = next(n for n in pruned.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]


def test_residual_add_couples_both_branches():
    b = GraphBuilder()
    s = b.op("Add", [conv(b, X, 3, 6), conv(b, X, 3, 6, k=1)])
    out = conv(b, b.op("Relu", [s]), 6, 2)
    pruned, groups = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert [len(g.sources) for g in groups if g.classes] == [2]
    assert shapes(pruned)[s] == [1, 3, 8, 8]


def test_squeeze_excite_gate_is_coupled_with_what_it_gates():
    b = GraphBuilder()
    x = b.op("HardSwish", [conv(b, X, 3, 8)])
    squeezed = b.op("Relu", [conv(b, b.op("GlobalAveragePool", [x]), 8, 4, k=1)])
    gate = b.op("HardSigmoid", [conv(b, squeezed, 4, 8, k=1)])
    gated = b.op("Mul", [x, gate])
    out = conv(b, gated, 8, 2, k=1)
    pruned, groups = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    coupled = next(g for g in groups if len(g.sources) == 2)
    assert len(coupled.classes) == 8
    assert shapes(pruned)[gated] == [1, 4, 8, 8] and shapes(pruned)[squeezed] == [1, 2, 1, 1]


def test_concat_keeps_offsets():
    b = GraphBuilder()
    cat = b.op("Concat", [conv(b, X, 3, 4), conv(b, X, 3, 6)], axis=1)
    out = conv(b, cat, 10, 2)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[cat] == [1, 5, 8, 8]


def test_concat_with_a_constant_block_and_along_another_axis():
    b = GraphBuilder()
    h = conv(b, X, 3, 4)
    cat = b.op("Concat", [h, b.weight(1, 2, 8, 8)], axis=1)  # two constant channels after the four
    tall = b.op("Concat", [cat, b.weight(1, 6, 2, 8)], axis=2)  # more rows: a per-channel constant
    out = conv(b, tall, 6, 2)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[cat] == [1, 4, 8, 8] and shapes(pruned)[tall] == [1, 4, 10, 8]


def test_split_and_slice_on_the_channel_axis():
    b = GraphBuilder()
    h = conv(b, X, 3, 8)
    left, right = b.op("Split", [h, b.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    tail = b.op("Slice", [h, b.const(np.array([2], np.int64)), b.const(np.array([7], np.int64)), b.const(np.array([1], np.int64))])
    out = b.op("Concat", [conv(b, left, 3, 2), conv(b, right, 5, 2), conv(b, tail, 5, 2)], axis=1)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    # Half of the 8 would empty the first split part: one of its channels is spared.
    assert (shapes(pruned)[left][1], shapes(pruned)[right][1], shapes(pruned)[tail][1]) == (1, 4, 4)


def test_equal_split_gets_explicit_sizes_and_shared_constants_are_copied():
    b = GraphBuilder()
    bias = b.weight(8)
    h = b.op("Conv", [X, b.weight(8, 3, 1, 1), bias])
    shared = b.op("Conv", [X, b.weight(8, 3, 1, 1), bias])  # same bias initializer, other channels kept
    left, right = b.op("Split", [h], n_out=2, axis=1)
    out = b.op("Concat", [conv(b, left, 4, 2), conv(b, right, 4, 2), shared], axis=1)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}), fraction=0.25)
    assert (shapes(pruned)[left][1], shapes(pruned)[right][1]) == (2, 4)
    assert sorted(onnx.numpy_helper.to_array(t).shape[0] for t in pruned.graph.initializer if t.name in (bias, f"{bias}_pruned")) == [6, 8]


def test_flatten_to_gemm_removes_a_block_of_columns_per_channel():
    b = GraphBuilder()
    h = b.op("MaxPool", [b.op("Relu", [conv(b, X, 3, 6)])], kernel_shape=[2, 2], strides=[2, 2])
    flat = b.op("Flatten", [h], axis=1)
    hidden = b.op("Relu", [b.op("Gemm", [flat, b.weight(5, 6 * 16), b.weight(5)], transB=1)])
    out = b.op("Gemm", [hidden, b.weight(5, 3), b.weight(3)])
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[flat] == [1, 3 * 16] and shapes(pruned)[hidden] == [1, 3]


def test_nhwc_graph_through_transposes_prelu_and_reduce_mean():
    b = GraphBuilder()
    nchw = b.op("Transpose", [X], perm=[0, 3, 1, 2])
    nhwc = b.op("Transpose", [conv(b, nchw, 3, 8)], perm=[0, 2, 3, 1])
    act = b.op("PRelu", [nhwc, b.weight(1, 1, 8)])
    mixed = b.op("MatMul", [act, b.weight(8, 6)])
    pooled = b.op("ReduceMean", [b.op("Add", [mixed, b.weight(6)])], axes=[1, 2], keepdims=0)
    out = b.op("Gemm", [pooled, b.weight(6, 3)])
    pruned, _ = prune_some(b.model({X: [1, 8, 8, 3]}, {out: None}), fraction=0.25)
    assert shapes(pruned)[act] == [1, 8, 8, 6] and shapes(pruned)[pooled] == [1, 5]


def test_channel_padding_before_a_residual_is_shortened():
    b = GraphBuilder()
    h = b.op("Relu", [conv(b, X, 3, 4)])
    grown = b.op("Pad", [h, b.const(np.array([0, 0, 0, 0, 0, 4, 0, 0], np.int64))])
    s = b.op("Add", [grown, conv(b, h, 4, 8)])
    out = conv(b, s, 8, 2)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[s][1] == shapes(pruned)[grown][1] < 8


def test_batchnorm_convtranspose_resize_and_per_channel_constants():
    b = GraphBuilder()
    h = conv(b, X, 3, 6)
    bn = b.op("BatchNormalization", [h, b.weight(6), b.weight(6), b.weight(6), b.const(np.ones(6, np.float32))])
    scaled = b.op("Mul", [bn, b.weight(1, 6, 1, 1)])
    up = b.op("ConvTranspose", [scaled, b.weight(6, 4, 2, 2), b.weight(4)], strides=[2, 2])
    resized = b.op("Resize", [up, "", b.const(np.array([1, 1, 0.5, 0.5], np.float32))], mode="nearest")
    out = conv(b, resized, 4, 2)
    pruned, _ = prune_some(b.model({X: [1, 3, 8, 8]}, {out: None}))
    assert shapes(pruned)[scaled][1] == 3 and shapes(pruned)[resized] == [1, 2, 8, 8]


def test_reshape_that_mixes_channels_freezes_the_group_and_the_pass_leaves_the_model_alone():
    b = GraphBuilder()
    h = conv(b, X, 3, 4)
    out = b.op("Reshape", [h, b.const(np.array([1, 8, 32], np.int64))])
    proto = b.model({X: [1, 3, 8, 8]}, {out: None})
    model = ir.serde.deserialize_model(proto)
    with pytest.warns(EdgecWarning, match="no channel group can be pruned"):
        result = ChannelPruning(ChannelPruningOptions(rate=0.5, reconstruct=False, importance="l1"))(model)
    assert not result.modified
    assert "reshape mixes channels" in result.details["frozen_groups"][0]["reasons"][0]
    assert to_proto(result.model).graph.node[0].input == proto.graph.node[0].input
    onnx.checker.check_model(to_proto(result.model), full_check=True)


def _residual_net() -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    h = b.op("Relu", [conv(b, X, 3, 16)])
    h = b.op("Relu", [b.op("Add", [h, conv(b, b.op("Relu", [conv(b, h, 16, 16)]), 16, 16)])])
    out = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])]), b.weight(16, 4)])
    return b.model({X: [1, 3, 8, 8]}, {out: None})


def _calibration(count: int = 16) -> InputSet:
    rng = np.random.default_rng(5)
    return InputSet([{X: rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(count)], "random")


def _counted_macs(model: ir.Model) -> int:
    return sum(row["macs"] for row in layer_table(model.graph))


def test_mac_target_round_to_and_reconstruction():
    proto = _residual_net()
    passes = make_passes([Step("prune", {"mac_reduction": 0.3, "round_to": 4})], _calibration)
    result = passes[0](ir.serde.deserialize_model(proto))
    macs = result.details["macs"]
    assert 1 - macs["after"] / macs["before"] >= 0.3
    # the search's count from kept channel fractions is the pruned model's own count
    assert (macs["before"], macs["after"]) == (_counted_macs(ir.from_proto(proto)), _counted_macs(result.model))
    assert all((g["channels"] - g["removed"]) % 4 == 0 for g in result.details["groups"])
    refits = result.details["reconstruction"]
    assert refits and all(r["error_after"] <= r["error_before"] for r in refits)
    assert any(r["error_after"] < 0.9 * r["error_before"] for r in refits)


def test_reconstruction_brings_outputs_closer_to_the_original():
    proto = _residual_net()
    feeds = random_feeds(proto)
    want = run_ort(proto, feeds)[0]
    errors = {}
    for reconstruct in (False, True):
        options = ChannelPruningOptions(rate=0.5, reconstruct=reconstruct)
        model = ChannelPruning(options, _calibration(64).batches)(ir.serde.deserialize_model(proto)).model
        errors[reconstruct] = np.abs(run_ort(to_proto(model), feeds)[0] - want).mean()
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("options, message", [
    ({"rate": 1.0}, "rate must be a number in"),
    ({"rate": -0.1}, "rate must be a number in"),
    ({"rate": 0.2, "mac_reduction": 0.2}, "either rate"),
    ({}, "either rate"),
    ({"rates": {"Conv_*": 1.5}}, r"rates\['Conv_\*'\] must be a number"),
    ({"rates": {"Conv_*": 0.5}, "scope": "global"}, "exclude each other"),
    ({"rate": 0.2, "importance": "l3"}, "importance must be one of"),
    ({"rate": 0.2, "colour": 1}, "has no option"),
])
def test_bad_options_are_recipe_errors(options, message):
    with pytest.raises(RecipeError, match=message):
        make_passes([Step("prune", options)], _calibration)


def test_per_layer_rates_override_the_default_rate():
    model = ir.serde.deserialize_model(_residual_net())
    names = [n.name for n in model.graph if n.op_type == "Conv"]
    (prune,) = make_passes([Step("prune", {"rate": 0.25, "rates": {names[1]: 0.5}, "round_to": 1, "reconstruct": False})], _calibration)
    groups = {tuple(g["layers"]): g["removed"] for g in prune(model).details["groups"]}
    assert groups == {(names[0], names[2]): 4, (names[1],): 8}  # residual stream at 0.25, inner conv at 0.5


def test_unknown_layer_names_are_errors():
    for options in ({"rate": 0.2, "exclude": ["no_such_conv*"]}, {"rates": {"no_such_conv*": 0.2}}):
        (prune,) = make_passes([Step("prune", options)], _calibration)
        with pytest.raises(RecipeError, match="matches none"):
            prune(ir.serde.deserialize_model(_residual_net()))


def test_unreachable_mac_target_is_an_error():
    b = GraphBuilder()
    out = conv(b, conv(b, X, 3, 2), 2, 64)  # most MACs are in the last conv, whose outputs are frozen
    (prune,) = make_passes([Step("prune", {"mac_reduction": 0.9, "reconstruct": False, "importance": "l2"})], _calibration)
    with pytest.raises(RecipeError, match="at most"):
        prune(ir.serde.deserialize_model(b.model({X: [1, 3, 8, 8]}, {out: None})))


def test_gelu_tanh_form_with_pow_keeps_the_mlp_hidden_channels_prunable():
    """GPT-2's MLP: c_fc → 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³))) → c_proj, h³ as Pow."""
    b = GraphBuilder()
    h = b.op("Add", [b.op("MatMul", [X, b.weight(8, 16)]), b.weight(16)])
    cubed = b.op("Mul", [b.op("Pow", [h, b.const(np.array(3.0, np.float32))]), b.const(np.array(0.044715, np.float32))])
    inner = b.op("Mul", [b.op("Add", [h, cubed]), b.const(np.array(0.7978846, np.float32))])
    one_plus = b.op("Add", [b.op("Tanh", [inner]), b.const(np.array(1.0, np.float32))])
    gelu = b.op("Mul", [b.op("Mul", [h, b.const(np.array(0.5, np.float32))]), one_plus])
    out = b.op("MatMul", [gelu, b.weight(16, 8)])
    pruned, _ = prune_some(b.model({X: [1, 4, 8]}, {out: None}))
    assert shapes(pruned)[gelu] == [1, 4, 8]


def test_a_branch_joining_a_frozen_stream_is_told_why():
    """GPT-2's MLP output joins a residual stream frozen earlier: its group once listed no
    reason, since reasons were kept only where a position met a fixed one directly."""
    b = GraphBuilder()
    stream = conv(b, X, 3, 4)
    frozen = b.op("Softmax", [stream], axis=1, name="channel_softmax")
    joined = b.op("Add", [stream, conv(b, X, 3, 4)])
    out = conv(b, joined, 4, 2)
    groups = channel_groups(ChannelGraph(ir.serde.deserialize_model(b.model({X: [1, 3, 8, 8]}, {frozen: None, out: None})).graph))
    stream_group, branch, _ = groups
    assert not branch.classes and branch.reasons == stream_group.reasons == ["Softmax 'channel_softmax' has no channel rule"]
