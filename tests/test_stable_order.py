"""ORT-optimized graphs in one canonical form (edgec.lower.stable_order): the same graph,
whatever order ORT wrote its nodes in and whatever names it made up, gives the same bytes."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edgec.errors import InternalError
from edgec.lower.stable_order import canonical

# Names the source model had; tf2onnx calls its tensors "<node>:<k>".
SOURCE = {"x", "y", "conv", "conv:0", "neg"}


def _optimized(order: list[int], token: str) -> onnx.ModelProto:
    """Source nodes whose outputs ORT renamed, and nodes ORT added, with names carrying a
    per-run ``token``, in ``order``."""
    nodes = [
        helper.make_node("Relu", ["x"], [f"conv_nchwc_{token}"], name="conv"),
        helper.make_node("Neg", [f"conv_nchwc_{token}"], ["conv:0"], name="neg"),
        helper.make_node("Abs", [f"conv_nchwc_{token}"], [f"reorder_{token}"], name=f"Reorder_{token}"),
        helper.make_node("Add", ["conv:0", f"reorder_{token}"], ["y"], name=f"Add_{token}"),
    ]
    graph = helper.make_graph([nodes[i] for i in order], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_same_graph_in_another_order_with_other_names_gives_the_same_bytes():
    first = canonical(_optimized([0, 1, 2, 3], "token_60"), SOURCE)
    second = canonical(_optimized([0, 2, 1, 3], "token_7"), SOURCE)
    assert first.SerializeToString() == second.SerializeToString()
    onnx.checker.check_model(first, full_check=True)


def test_source_names_are_kept_and_made_up_ones_never_collide_with_them():
    graph = canonical(_optimized([0, 1, 2, 3], "t"), SOURCE).graph
    assert graph.node[0].name == "conv" and "conv:0" in [v for n in graph.node if n.name == "neg" for v in n.output]
    values = [v for n in graph.node for v in n.output]
    assert len(values) == len(set(values))
    assert all(v in SOURCE or v.startswith("ort/") for v in values)
    assert all(n.name in SOURCE or n.name.startswith("ort/") for n in graph.node)


def _branch(value: str, output: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Neg", [value], [output])], "branch", [],
                             [helper.make_tensor_value_info(output, TensorProto.FLOAT, [2])])


def test_a_branch_waits_for_the_outer_value_it_reads_and_omitted_values_link_nothing():
    """An If placed before the node computing what its branches read, or an LSTM whose
    omitted input and output ('') looked like one value, left ORT an unsorted or cut graph;
    the branches read the outer values by their new names."""
    nodes = [helper.make_node("Relu", ["x"], [f"outer{i}"], name=f"relu{i}") for i in range(6)]
    nodes += [helper.make_node("If", ["c"], [f"y{i}"], name=f"if{i}", then_branch=_branch(f"outer{i}", f"t{i}"),
                               else_branch=_branch(f"outer{i}", f"e{i}")) for i in range(6)]
    nodes.append(helper.make_node("LSTM", ["x3", "w", "r", "", "", "h0"], ["", "h"], name="lstm", hidden_size=1))
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(6)], ["y"], name="sum"))
    shapes = {"x": [2], "x3": [1, 1, 1], "w": [1, 4, 1], "r": [1, 4, 1], "h0": [1, 1, 1]}
    floats = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in shapes.items()]
    graph = helper.make_graph(nodes[::-1], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []), *floats],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 1])])
    source = {*shapes, "c", "y", "h", *(f"y{i}" for i in range(6))}  # ORT named the Relus' outputs
    model = canonical(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    assert len(model.graph.node) == len(nodes)
    onnx.checker.check_model(model, full_check=True)


def test_a_cycle_is_an_internal_error():
    nodes = [helper.make_node("Neg", ["b"], ["a"], name="first"), helper.make_node("Neg", ["a"], ["b"], name="second")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    with pytest.raises(InternalError, match="cycle through node"):
        canonical(helper.make_model(graph), set())
