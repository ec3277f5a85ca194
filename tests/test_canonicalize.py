"""Canonicalization passes: each rule on a graph built for it, outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import GraphBuilder, random_feeds, run_ort, save

from edgec import model as edgec_model
from edgec.errors import DynamicShapeError, EdgecWarning, ModelCheckError
from edgec.passes.canonicalize import (
    DefaultBatchSize,
    DropBroadcastExpand,
    FixInputShapes,
    FoldBatchNorm,
    RequireStaticInputs,
    canonicalize_passes,
)
from edgec.passes.pipeline import Pipeline


def canonical(proto, tmp_path, shapes=None):
    return Pipeline(canonicalize_passes(shapes))(edgec_model.load(save(proto, tmp_path)))


def assert_same_outputs(proto, model, feeds=None):
    feeds = feeds or random_feeds(proto)
    for want, got in zip(run_ort(proto, feeds), run_ort(edgec_model.to_proto(model), feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def bn(g, x, channels):
    return g.op("BatchNormalization", [x, g.const(np.linspace(0.5, 2, channels).astype(np.float32)), g.weight(channels),
                                       g.weight(channels), g.const(np.linspace(0.5, 1.5, channels).astype(np.float32))])


def test_batchnorm_folds_into_conv_exactly(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", [bn(g, g.op("Conv", ["x", g.weight(6, 3, 3, 3)], pads=[1, 1, 1, 1]), 6)])
    proto = g.model({"x": [1, 3, 8, 8]}, {y: [1, 6, 8, 8]})
    model, records = canonical(proto, tmp_path)
    assert [n.op_type for n in model.graph] == ["Conv", "Relu"]
    assert next(r for r in records if r.name == "fold-batchnorm").details["folded"]
    assert_same_outputs(proto, model)


def test_batchnorm_folds_into_grouped_conv_transpose(tmp_path):
    g = GraphBuilder()
    y = bn(g, g.op("ConvTranspose", ["x", g.weight(4, 3, 2, 2), g.weight(6)], group=2, strides=[2, 2]), 6)
    proto = g.model({"x": [1, 4, 4, 4]}, {y: [1, 6, 8, 8]})
    model, _ = canonical(proto, tmp_path)
    assert [n.op_type for n in model.graph] == ["ConvTranspose"]
    assert_same_outputs(proto, model)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folds_into_gemm(tmp_path, trans_b):
    g = GraphBuilder()
    weight = g.weight(*((5, 8) if trans_b else (8, 5)))
    y = bn(g, g.op("Gemm", ["x", weight, g.weight(5)], transB=trans_b, beta=0.5), 5)
    proto = g.model({"x": [2, 8]}, {y: [2, 5]})
    model, _ = canonical(proto, tmp_path)
    assert [n.op_type for n in model.graph] == ["Gemm"]
    assert_same_outputs(proto, model)


def test_batchnorm_after_shared_weight_is_not_folded(tmp_path):
    g = GraphBuilder()
    w = g.weight(4, 4, 1, 1)
    a = bn(g, g.op("Conv", ["x", w]), 4)
    y = g.op("Add", [a, g.op("Conv", ["x", w])])
    proto = g.model({"x": [1, 4, 4, 4]}, {y: [1, 4, 4, 4]})
    model, _ = canonical(proto, tmp_path)
    assert "BatchNormalization" in [n.op_type for n in model.graph]
    assert_same_outputs(proto, model)


def test_folding_keeps_graph_output_name(tmp_path):
    g = GraphBuilder()
    y = bn(g, g.op("Conv", ["x", g.weight(4, 3, 1, 1)]), 4)
    proto = g.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    model, _ = canonical(proto, tmp_path)
    assert [o.name for o in model.graph.outputs] == [y]


def test_shape_arithmetic_folds_to_constants(tmp_path):
    g = GraphBuilder()
    c = g.op("Relu", ["x"])
    batch = g.op("Gather", [g.op("Shape", [c]), g.const(np.array([0], np.int64))], axis=0)
    target = g.op("Concat", [batch, g.const(np.array([-1], np.int64))], axis=0)
    y = g.op("Reshape", [c, target])
    proto = g.model({"x": ["n", 3, 4, 4]}, {y: ["n", 48]})
    model, _ = canonical(proto, tmp_path, {"x": (2, 3, 4, 4)})
    assert [n.op_type for n in model.graph] == ["Relu", "Reshape"]
    assert_same_outputs(proto, model, {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)})


def test_single_unnamed_shape_applies_to_only_input(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    model = edgec_model.load(save(g.model({"x": ["n", 4]}, {y: ["n", 4]}), tmp_path))
    Pipeline([FixInputShapes({"": (3, 4)}), RequireStaticInputs()])(model)
    assert list(model.graph.inputs[0].shape.dims) == [3, 4]


def test_shape_rank_mismatch_is_an_error(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    model = edgec_model.load(save(g.model({"x": ["n", 4]}, {y: ["n", 4]}), tmp_path))
    with pytest.raises(DynamicShapeError, match="rank 2"):
        Pipeline([FixInputShapes({"x": (1, 2, 4)})])(model)


def test_unknown_input_name_is_an_error(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    model = edgec_model.load(save(g.model({"x": ["n", 4]}, {y: ["n", 4]}), tmp_path))
    with pytest.raises(DynamicShapeError, match="model's inputs are \\['x'\\]"):
        Pipeline([FixInputShapes({"image": (1, 4)})])(model)


def test_inconsistent_shapes_fail_inference(tmp_path):
    g = GraphBuilder()
    y = g.op("Add", ["x", g.weight(5)])
    proto = onnx.helper.make_model(
        onnx.helper.make_graph(g.nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                               [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.FLOAT, ["n", 4])], g.initializers),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(ModelCheckError, match="Shape inference failed"):
        canonical(proto, tmp_path, {"x": (1, 4)})


def test_old_opset_is_upgraded(tmp_path):
    g = GraphBuilder()
    y = g.op("Softmax", [g.op("Relu", ["x"])], axis=1)
    proto = g.model({"x": [2, 3, 4]}, {y: [2, 3, 4]}, opset=11)
    model, _ = canonical(proto, tmp_path)
    assert model.opset_imports[""] == 13
    assert_same_outputs(proto, model)


def test_fold_batchnorm_is_a_noop_without_batchnorm(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    model = edgec_model.load(save(g.model({"x": [1, 4]}, {y: [1, 4]}), tmp_path))
    result = FoldBatchNorm()(model)
    assert not result.modified and result.details == {"folded": []}


def two_input_model(tmp_path, x_shape, s_shape):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    proto = g.model({"x": x_shape, "s": s_shape}, {y: x_shape, "s": s_shape})
    return edgec_model.load(save(proto, tmp_path))


def test_symbolic_batch_defaults_to_one_and_binds_the_same_symbol_elsewhere(tmp_path):
    model = two_input_model(tmp_path, ["batch", 3, 4, 4], [2, "batch", 8])
    with pytest.warns(EdgecWarning, match="Built for batch size 1"):
        _, records = Pipeline([DefaultBatchSize(), RequireStaticInputs()])(model)
    assert [list(v.shape.dims) for v in model.graph.inputs] == [[1, 3, 4, 4], [2, 1, 8]]
    assert records[0].details["inputs"] == {"x": "batch"} and "--input-shape x=Nx3x4x4" in records[0].details["note"]


@pytest.mark.filterwarnings("ignore::edgec.errors.EdgecWarning")
def test_minus_one_batch_defaults_and_other_symbols_stay_errors(tmp_path):
    model = two_input_model(tmp_path, [-1, 3, 4, 4], ["n", "seq", 8])
    with pytest.raises(DynamicShapeError, match=r"'s' \(1xseqx8\) in dim 1 \(seq\).*--input-shape s=1xSIZEx8"):
        Pipeline([DefaultBatchSize(), RequireStaticInputs()])(model)
    assert list(model.graph.inputs[0].shape.dims) == [1, 3, 4, 4]


def test_pinned_symbol_applies_to_other_inputs_and_minus_one_can_be_pinned(tmp_path):
    model = two_input_model(tmp_path, [-1, "seq", 4], ["seq", 8])
    Pipeline([FixInputShapes({"x": (2, 5, 4)}), DefaultBatchSize(), RequireStaticInputs()])(model)
    assert [list(v.shape.dims) for v in model.graph.inputs] == [[2, 5, 4], [5, 8]]


def test_input_of_unknown_rank_is_named(tmp_path):
    model = two_input_model(tmp_path, [1, 4], [1, 8])
    model.graph.inputs[1].shape = None
    with pytest.raises(DynamicShapeError, match="'s' has no declared shape"):
        Pipeline([DefaultBatchSize(), RequireStaticInputs()])(model)



def test_identity_returning_an_outer_value_from_a_branch_is_kept(tmp_path):
    """An If branch that passes an outer value through an Identity (PyTorch RNN exports do)."""
    make = onnx.helper
    outer = make.make_node("Relu", ["x"], ["r"])
    branch = lambda name, node: make.make_graph(  # noqa: E731
        [node], name, [], [make.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1, 4])])
    then = branch("then", make.make_node("Identity", ["r"], ["then_out"]))
    other = branch("else", make.make_node("Neg", ["r"], ["else_out"]))
    positive = [make.make_node("ReduceSum", ["x"], ["s"], keepdims=0), make.make_node("Greater", ["s", "zero"], ["c"])]
    graph = make.make_graph(
        [outer, *positive, make.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
        [make.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [make.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [onnx.numpy_helper.from_array(np.float32(0), "zero")])
    proto = make.make_model(graph, opset_imports=[make.make_opsetid("", 17)])
    proto.ir_version = 8
    model, _ = canonical(proto, tmp_path)
    assert_same_outputs(proto, model)


def test_unnamed_and_repeated_node_names_become_unique(tmp_path):
    """Passes name the nodes they add after the node they replace, and errors name nodes."""
    g = GraphBuilder()
    y = g.op("Neg", [g.op("Tanh", [g.op("Sigmoid", [g.op("Relu", ["x"], name="kept")])])])
    proto = g.model({"x": [1, 4]}, {y: [1, 4]})
    for node, name in zip(proto.graph.node, ["kept", "", "twice", "twice"]):
        node.name = name
    model, _ = canonical(proto, tmp_path)
    names = [n.name for n in model.graph]
    assert names[0] == "kept" and names[2] == "twice"
    assert all(names) and len(set(names)) == len(names), names


def test_expand_before_an_op_that_broadcasts_anyway_is_dropped(tmp_path):
    """PyTorch's ``x * gate.expand_as(x)``; an Expand that sets the result's shape stays."""
    g = GraphBuilder()
    x = g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    gate = g.op("Sigmoid", [g.op("GlobalAveragePool", [x])])
    gated = g.op("Mul", [x, g.op("Expand", [gate, g.const(np.array([1, 4, 8, 8], np.int64))])])
    other = g.op("Relu", [gate])
    grown = g.op("Add", [other, g.op("Expand", [other, g.const(np.array([1, 4, 8, 8], np.int64))])])
    proto = g.model({"x": [1, 3, 8, 8]}, {gated: [1, 4, 8, 8], grown: [1, 4, 8, 8]})
    model, records = canonical(proto, tmp_path)
    assert [n.op_type for n in model.graph].count("Expand") == 1
    assert len(next(r for r in records if r.name == DropBroadcastExpand.name).details["dropped"]) == 1
    assert_same_outputs(proto, model)
