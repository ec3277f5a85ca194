"""Decomposition: rewrite composite ops into primitives every backend has.

Runs after canonicalization for backends that lack a kernel for the composite form. A
BatchNormalization that could not be folded into a preceding layer (e.g. after an Add)
becomes ``x * scale + shift`` with per-channel constants, which the layout pass can then
move through like any elementwise op.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph import add_initializer, attr, constant, take_name
from edgec.passes.pipeline import PassOutcome


def _decompose_batchnorm(graph: ir.Graph, bn: ir.Node) -> bool:
    params = [constant(v) for v in bn.inputs[1:5]]
    x = bn.inputs[0]
    if any(p is None for p in params) or len(bn.outputs) != 1 or x.shape is None or attr(bn, "training_mode", 0):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    shift = beta - mean * scale
    # Channels are axis 1; trailing unit dims make the constants broadcast over space.
    trailing = (1,) * (x.shape.rank() - 2)
    dtype = params[0].dtype
    scale_v = add_initializer(graph, scale.reshape((-1,) + trailing).astype(dtype), f"{bn.name}_scale")
    shift_v = add_initializer(graph, shift.reshape((-1,) + trailing).astype(dtype), f"{bn.name}_shift")
    mul = ir.node("Mul", [x, scale_v], name=f"{bn.name}_mul")
    add = ir.node("Add", [mul.outputs[0], shift_v], name=f"{bn.name}_add")
    for value in (mul.outputs[0], add.outputs[0]):
        value.dtype, value.shape = x.dtype, x.shape
    graph.insert_before(bn, [mul, add])
    out = bn.outputs[0]
    was_output = out.is_graph_output()
    out.replace_all_uses_with(add.outputs[0], replace_graph_outputs=True)
    if was_output:
        take_name(add.outputs[0], out, graph)
    graph.remove(bn, safe=True)
    return True


class DecomposeBatchNorm(ir.passes.InPlacePass):
    """Standalone inference-mode BatchNormalization → Mul + Add."""

    name = "decompose-batchnorm"

    def call(self, model: ir.Model) -> PassOutcome:
        done = [n.name for n in list(model.graph) if n.op_type == "BatchNormalization" and _decompose_batchnorm(model.graph, n)]
        return PassOutcome(model, bool(done), {"decomposed": done})
