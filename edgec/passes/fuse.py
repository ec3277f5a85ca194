"""Fusion: recognize multi-node spellings of one function and replace them with one node.

Exporters write GELU as ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (in several association orders);
backends with a GELU kernel (TFLite) run it as one op, and backends without an ERF kernel
could not run the spelled-out form at all. The fused node lives in the ``edgec`` domain
because the standard ``Gelu`` op needs opset 20, and raising a model's opset would change the
meaning of its other ops.

PyTorch writes GroupNorm as ``Reshape(N, G, -1) → InstanceNormalization → Reshape back``
(then the affine Mul and Add). Those Reshapes mix channels with pixels, so in channels-last
form each one needs a full TRANSPOSE pair; fused, the group norm runs channels-last itself.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from edgec.graph import add_initializer, attr, constant, sole_consumer, static_shape, take_name
from edgec.passes.pipeline import PassOutcome

FUSED_DOMAIN = "edgec"


def _split_scalar(node: ir.Node | None, op_type: str) -> tuple[ir.Value, float] | None:
    """For ``op(v, c)``/``op(c, v)`` with scalar constant c: (v, c)."""
    if node is None or node.op_type != op_type or len(node.inputs) != 2:
        return None
    for data_index in (0, 1):
        c = constant(node.inputs[1 - data_index])
        if c is not None and c.size == 1 and constant(node.inputs[data_index]) is None:
            if op_type == "Div" and data_index == 1:
                return None  # c / v is not a scaling of v
            return node.inputs[data_index], float(c.reshape(-1)[0])
    return None


def _near(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * abs(b)


def _erf_argument(erf: ir.Node) -> ir.Value | None:
    """x when the Erf reads x / sqrt(2) (as a Div or a Mul)."""
    producer = erf.inputs[0].producer()
    div = _split_scalar(producer, "Div")
    if div and _near(div[1], math.sqrt(2)):
        return div[0]
    mul = _split_scalar(producer, "Mul")
    if mul and _near(mul[1], 1 / math.sqrt(2)):
        return mul[0]
    return None


def _gelu_output(x: ir.Value, one_plus_erf: ir.Value) -> ir.Node | None:
    """The node computing ``x * 0.5 * one_plus_erf``, in any of the usual association orders."""
    mul = sole_consumer(one_plus_erf)
    if mul is None or mul.op_type != "Mul":
        return None
    other = mul.inputs[1] if mul.inputs[0] is one_plus_erf else mul.inputs[0]
    half = _split_scalar(other.producer(), "Mul")
    if half and half[0] is x and _near(half[1], 0.5):
        return mul  # (x * 0.5) * (1 + erf)
    after = sole_consumer(mul.outputs[0])
    if other is x:
        scaled = _split_scalar(after, "Mul")
        return after if scaled and _near(scaled[1], 0.5) else None  # (x * (1 + erf)) * 0.5
    c = constant(other)
    if c is not None and c.size == 1 and _near(float(c.reshape(-1)[0]), 0.5) and after is not None and after.op_type == "Mul":
        return after if x in after.inputs else None  # x * ((1 + erf) * 0.5)
    return None


def _fuse_gelu(graph: ir.Graph, erf: ir.Node) -> bool:
    x = _erf_argument(erf)
    add = _split_scalar(sole_consumer(erf.outputs[0]), "Add")
    if x is None or add is None or not _near(add[1], 1.0):
        return False
    out_node = _gelu_output(x, sole_consumer(erf.outputs[0]).outputs[0])
    if out_node is None:
        return False
    _replace_output(graph, out_node, ir.node("Gelu", [x], domain=FUSED_DOMAIN, name=f"{erf.name}_gelu"))
    return True


class FuseGelu(ir.passes.InPlacePass):
    """``x * 0.5 * (1 + erf(x / sqrt 2))`` → ``edgec::Gelu(x)`` (exact GELU)."""

    name = "fuse-gelu"

    def call(self, model: ir.Model) -> PassOutcome:
        fused = [n.name for n in list(model.graph) if n.op_type == "Erf" and n.graph is not None and _fuse_gelu(model.graph, n)]
        return _outcome(model, fused)


def _outcome(model: ir.Model, fused: list[str]) -> PassOutcome:
    """Declare the fused domain and drop the nodes the fused ones replaced."""
    if fused:
        model.opset_imports.setdefault(FUSED_DOMAIN, 1)
        ir_common.RemoveUnusedNodesPass()(model)
    return PassOutcome(model, bool(fused), {"fused": len(fused)})


def _group_norm_parts(norm: ir.Node) -> tuple[ir.Value, int, ir.Node] | None:
    """(x, groups, final Reshape) when ``norm`` is the InstanceNormalization of a GroupNorm:
    x [N, C, *S] (1-D or 2-D S, as convolutions have) reshaped to [N, G, K] with G dividing C,
    and reshaped back to x's shape."""
    grouped, into = norm.inputs[0], norm.inputs[0].producer()
    back = sole_consumer(norm.outputs[0])
    if into is None or into.op_type != "Reshape" or back is None or back.op_type != "Reshape":
        return None
    x = into.inputs[0]
    shape, grouped_shape = static_shape(x), static_shape(grouped)
    if shape is None or grouped_shape is None or len(shape) not in (3, 4) or len(grouped_shape) != 3 or static_shape(back.outputs[0]) != shape:
        return None
    groups = grouped_shape[1]
    if grouped_shape[0] != shape[0] or groups < 1 or shape[1] % groups:
        return None
    return x, groups, back


def _fuse_group_norm(graph: ir.Graph, norm: ir.Node) -> bool:
    parts = _group_norm_parts(norm)
    scale, bias = constant(norm.inputs[1]), constant(norm.inputs[2])
    if parts is None or scale is None or bias is None:
        return False
    x, groups, back = parts
    _replace_output(graph, back, _group_norm(graph, norm, x, groups, (scale, bias), static_shape(x)[1] // groups))
    return True


def _group_norm(graph: ir.Graph, norm: ir.Node, x: ir.Value, groups: int, affine: tuple[np.ndarray, np.ndarray],
                repeat: int) -> ir.Node:
    """``edgec::GroupNorm`` of ``x`` with ``norm``'s epsilon; scale and bias (``affine``) each
    value repeated ``repeat`` times, to one per channel."""
    scale, bias = (add_initializer(graph, np.repeat(v.reshape(-1), repeat).astype(np.float32), f"{norm.name}_{kind}")
                   for v, kind in zip(affine, ("scale", "bias")))
    return ir.node("GroupNorm", [x, scale, bias], attributes={"num_groups": groups, "epsilon": float(attr(norm, "epsilon", 1e-5))},
                   domain=FUSED_DOMAIN, name=f"{norm.name}_group_norm")


def _from_group_normalization(graph: ir.Graph, node: ir.Node) -> bool:
    """ONNX's own GroupNormalization op → ``edgec::GroupNorm``. Its scale and bias are per
    channel, as the fused node's (opset 21; the checker refuses opset 18's per-group form)."""
    x, scale, bias = node.inputs[0], constant(node.inputs[1]), constant(node.inputs[2])
    shape, groups = static_shape(x), attr(node, "num_groups", 0)
    if (shape is None or len(shape) not in (3, 4) or scale is None or bias is None or not groups or shape[1] % groups
            or scale.size != shape[1] or bias.size != shape[1]):
        return False
    _replace_output(graph, node, _group_norm(graph, node, x, groups, (scale, bias), 1))
    return True


def _replace_output(graph: ir.Graph, old_node: ir.Node, new_node: ir.Node) -> None:
    """``new_node`` computes what ``old_node`` did: insert it after, move every use over."""
    result, old = new_node.outputs[0], old_node.outputs[0]
    result.dtype, result.shape = old.dtype, old.shape
    graph.insert_after(old_node, new_node)
    was_output = old.is_graph_output()
    old.replace_all_uses_with(result, replace_graph_outputs=True)
    if was_output:
        take_name(result, old, graph)


class FuseGroupNorm(ir.passes.InPlacePass):
    """``Reshape → InstanceNormalization → Reshape`` (PyTorch's GroupNorm), and ONNX's own
    ``GroupNormalization``, → ``edgec::GroupNorm``, with per-channel scale and bias (a group's
    repeated), which the layout pass then runs channels-last."""

    name = "fuse-group-norm"

    def call(self, model: ir.Model) -> PassOutcome:
        fused = [n.name for n in list(model.graph) if n.graph is not None and n.domain in ("", "ai.onnx") and (
            (n.op_type == "InstanceNormalization" and _fuse_group_norm(model.graph, n))
            or (n.op_type == "GroupNormalization" and _from_group_normalization(model.graph, n)))]
        return _outcome(model, fused)
