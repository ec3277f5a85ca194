"""ORT-optimized graphs in one canonical form (edgec.lower.stable_order): the same graph,
whatever order ORT wrote its nodes in and whatever names it made up, gives the same bytes."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

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
