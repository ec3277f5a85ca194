"""Intermediate activations on calibration data (edgec.activations): capture and the walk."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from helpers import GraphBuilder
from onnx import TensorProto, helper

from edgec.activations import Walk, capture
from edgec.graph import constant, replace_initializer_data


def _branchy_model() -> ir.Model:
    """conv_a → relu → conv_b → relu → conv_d → relu, added to conv_a's relu, through an If
    whose branches read that sum from outside, into conv_c: stops with a residual that spans
    two of them and a subgraph between."""
    g = GraphBuilder(seed=3)
    a = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3)], name="conv_a", pads=[1, 1, 1, 1])])
    b = g.op("Relu", [g.op("Conv", [a, g.weight(4, 4, 3, 3)], name="conv_b", pads=[1, 1, 1, 1])])
    d = g.op("Relu", [g.op("Conv", [b, g.weight(4, 4, 1, 1)], name="conv_d")])
    total = g.op("Add", [a, d])
    branch = {name: helper.make_graph([helper.make_node(op, [total], [f"{name}_out"])], name, [],
                                      [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])
              for name, op in (("then", "Neg"), ("else", "Identity"))}
    chosen = g.op("If", [g.const(np.array(True), "flip")], then_branch=branch["then"], else_branch=branch["else"])
    y = g.op("Conv", [chosen, g.weight(2, 4, 1, 1)], name="conv_c")
    return ir.from_proto(g.model({"x": [1, 3, 6, 6]}, {y: None}))


def _batches(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(count)]


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_walk_gives_each_stop_its_input_after_the_changes_before_it():
    model, batches = _branchy_model(), _batches()
    stops = [_node(model, name) for name in ("conv_a", "conv_b", "conv_d", "conv_c")]
    unchanged = capture(model, [stops[-1].inputs[0]], batches)[stops[-1].inputs[0].name]
    walk = Walk(model, batches, stops)
    for stop in stops:
        taken = walk.input_of(stop)
        np.testing.assert_array_equal(taken, capture(model, [stop.inputs[0]], batches)[stop.inputs[0].name])
        weight = stop.inputs[1]
        replace_initializer_data(weight, constant(weight) * np.float32(0.5))  # the next stop must see this
    assert not np.allclose(taken, unchanged)  # conv_c's input moved with the weights before it


def test_walk_feeds_a_graph_input_to_a_stop_as_it_is():
    model, batches = _branchy_model(), _batches(2)
    stop = _node(model, "conv_a")
    np.testing.assert_array_equal(Walk(model, batches, [stop]).input_of(stop), np.concatenate([b["x"] for b in batches]))


def test_walk_refuses_a_stop_before_its_position():
    model = _branchy_model()
    stops = [_node(model, "conv_a"), _node(model, "conv_c")]
    walk = Walk(model, _batches(1), stops)
    walk.input_of(stops[1])
    with pytest.raises(ValueError, match="graph order"):
        walk.input_of(stops[0])
