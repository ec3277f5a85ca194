"""Layers as row-wise linear maps (edgec.refit) and layer selection (edgec.passes.layers)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, run_ort

from edgec.errors import RecipeError
from edgec.graph import constant
from edgec.passes.layers import LayerSelection, select_layers
from edgec.refit import least_squares, output_rows, patches
from edgec.weights import weight_view


def _single_layer(op: str, x_shape, w_shape, **attrs):
    """One layer with a seeded weight (and a bias for Conv/Gemm)."""
    g = GraphBuilder(seed=1)
    outputs = w_shape[0] if op == "Conv" or attrs.get("transB") else w_shape[-1]
    bias = [] if op == "MatMul" else [g.weight(outputs)]
    y = g.op(op, ["x", g.weight(*w_shape), *bias], name="layer", **attrs)
    return g.model({"x": x_shape}, {y: None})


CASES = [
    ("Conv", [2, 3, 7, 6], [4, 3, 3, 3], {"pads": [1, 1, 1, 1]}),
    ("Conv", [1, 3, 9, 8], [5, 3, 3, 2], {"strides": [2, 1], "pads": [0, 1, 2, 0], "dilations": [1, 2]}),
    ("Conv", [1, 2, 7, 7], [3, 2, 3, 3], {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("Conv", [1, 2, 6, 6], [3, 2, 2, 2], {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("Conv", [1, 2, 6, 6], [3, 2, 3, 3], {"auto_pad": "VALID"}),
    ("Conv", [3, 4, 5, 5], [6, 4, 1, 1], {}),
    ("Gemm", [5, 4], [4, 3], {}),
    ("Gemm", [4, 5], [3, 4], {"transA": 1, "transB": 1}),
    ("MatMul", [2, 3, 4], [4, 6], {}),
]


@pytest.mark.parametrize("op, x_shape, w_shape, attrs", CASES)
def test_layer_output_is_patches_times_weight_matrix(op, x_shape, w_shape, attrs):
    proto = _single_layer(op, x_shape, w_shape, **attrs)
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    y = run_ort(proto, {"x": x})[0]
    node = next(iter(ir.from_proto(proto).graph))
    view = weight_view(node, constant(node.inputs[1]))  # [1, out, in, taps]
    matrix = view[0].reshape(view.shape[1], -1)
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 else 0.0
    np.testing.assert_allclose(patches(node, x) @ matrix.T + bias, output_rows(node, y), rtol=1e-4, atol=1e-4)


def test_grouped_conv_is_refused():
    proto = _single_layer("Conv", [1, 4, 5, 5], [4, 1, 3, 3], group=4)
    with pytest.raises(ValueError, match="grouped"):
        patches(next(iter(ir.from_proto(proto).graph)), np.zeros((1, 4, 5, 5), np.float32))


def test_least_squares_recovers_a_linear_map_and_survives_dead_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 6))
    a[:, 2] = 0.0  # a channel that never fires
    truth = rng.standard_normal((6, 3))
    truth[2] = 0.0
    np.testing.assert_allclose(least_squares(a, a @ truth), truth, atol=1e-4)


def _nodes():
    g = GraphBuilder()
    h = g.op("Conv", ["x", g.weight(2, 2, 1, 1)], name="stem.conv")
    h = g.op("Conv", [h, g.weight(2, 2, 1, 1)], name="block1.conv")
    y = g.op("Gemm", [g.op("Flatten", [h]), g.weight(8, 3)], name="head.fc")
    return [n for n in ir.from_proto(g.model({"x": [1, 2, 2, 2]}, {y: None})).graph if n.op_type in ("Conv", "Gemm")]


def test_selection_by_op_type_and_patterns_exclusion_wins():
    nodes = _nodes()
    names = lambda sel: [n.name for n in select_layers(nodes, sel, "prune")]  # noqa: E731
    assert names(LayerSelection()) == ["stem.conv", "block1.conv", "head.fc"]
    assert names(LayerSelection(op_types="Conv")) == ["stem.conv", "block1.conv"]
    assert names(LayerSelection(include=["*.conv"], exclude="stem.*")) == ["block1.conv"]


@pytest.mark.parametrize("selection, message", [
    (LayerSelection(include=["blocks.*"]), "include pattern 'blocks.*' matches none"),
    (LayerSelection(exclude=["fc"]), "exclude pattern 'fc' matches none"),
    (LayerSelection(op_types=["MatMul"]), "no layer it can change has op type MatMul"),
    (LayerSelection(include=["stem.*"], exclude=["stem.*"]), "leaves nothing"),
])
def test_selection_mistakes_are_errors(selection, message):
    with pytest.raises(RecipeError, match=message.replace("*", r"\*").replace(".", r"\.")):
        select_layers(_nodes(), selection, "prune")
