"""Model summaries for ``edgec inspect`` and reports: I/O, op histogram, parameters, MACs.

MACs (multiply-accumulates) are counted for the layers that dominate edge inference cost —
convolutions and matrix products — from inferred static shapes; a layer whose shapes are
not static gets ``None`` and is listed so the user can pin ``--input-shape``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import onnx_ir as ir

from edgec.graph import attr, constant, op_histogram, static_shape


def _conv_macs(node: ir.Node) -> int | None:
    out, weight = static_shape(node.outputs[0]), static_shape(node.inputs[1])
    if out is None or weight is None:
        return None
    # weight [Cout, Cin/group, k...]: each output element needs Cin/group * prod(k) MACs.
    return math.prod(out) * math.prod(weight[1:])


def _conv_transpose_macs(node: ir.Node) -> int | None:
    inp, weight = static_shape(node.inputs[0]), static_shape(node.inputs[1])
    if inp is None or weight is None:
        return None
    # weight [Cin, Cout/group, k...]: each input element scatters into Cout/group * prod(k).
    return math.prod(inp) * math.prod(weight[1:])


def _gemm_macs(node: ir.Node) -> int | None:
    out, a = static_shape(node.outputs[0]), static_shape(node.inputs[0])
    if out is None or a is None:
        return None
    k = a[0] if attr(node, "transA", 0) else a[-1]
    return math.prod(out) * k


def _matmul_macs(node: ir.Node) -> int | None:
    out, a = static_shape(node.outputs[0]), static_shape(node.inputs[0])
    if out is None or a is None:
        return None
    return math.prod(out) * a[-1]


def _recurrent_macs(node: ir.Node) -> int | None:
    x, w, r = (static_shape(v) for v in node.inputs[:3])
    if x is None or w is None or r is None:
        return None
    # Every step, every gate of every direction multiplies the input and the hidden state:
    # W [dirs, gates·hidden, features], R [dirs, gates·hidden, hidden]; x is [steps, batch, ...] either way round.
    return x[0] * x[1] * w[0] * w[1] * (w[2] + r[2])


# Op type → MAC counter; ops not listed cost no MACs (elementwise work is not counted).
MAC_COUNTERS: dict[str, Callable[[ir.Node], int | None]] = {
    "Conv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "MatMul": _matmul_macs,
    "LSTM": _recurrent_macs,
    "GRU": _recurrent_macs,
}


# Ops found only in quantized models, in ai.onnx or com.microsoft (matched in any domain).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QGemm", "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
    "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "MulInteger", "ReduceSumInteger",
    "GatherBlockQuantized", "QuantizeWithOrder", "DequantizeWithOrder", "QuantizeBFP", "DequantizeBFP",
})
QUANTIZED_PREFIXES = ("QLinear", "QOrdered")  # QLinearConv, QLinearAdd, ..., QOrderedMatMul, ...
INTEGER_WEIGHTS = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4})


def quantized_nodes(model: ir.Model) -> list[str]:
    """Names of the nodes (subgraphs included) that show the model is already quantized:
    quantize/dequantize and integer ops, or a MAC-bearing op with an 8/4-bit constant weight."""
    return [node.name or f"{node.op_type} #{i}" for i, node in enumerate(model.graph.all_nodes()) if is_quantized(node)]


def is_quantized(node: ir.Node) -> bool:
    """Whether ``node`` is one that only quantized models hold (see ``quantized_nodes``)."""
    return node.op_type in QUANTIZED_OPS or node.op_type.startswith(QUANTIZED_PREFIXES) or _integer_weight(node)


def _integer_weight(node: ir.Node) -> bool:
    return node.op_type in MAC_COUNTERS and any(_constant_dtype(v) in INTEGER_WEIGHTS for v in node.inputs[:2])


def _constant_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The dtype of an initializer or a Constant node's tensor; None for computed values."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.dtype
    producer = value.producer()
    tensor = producer.attributes.get("value") if producer is not None and producer.op_type == "Constant" else None
    return tensor.value.dtype if tensor is not None and tensor.type == ir.AttributeType.TENSOR else None


def layer_table(graph: ir.Graph) -> list[dict[str, Any]]:
    """One row per MAC-bearing node: name, op, output shape, parameters and MACs."""
    rows = []
    for node in graph:
        counter = MAC_COUNTERS.get(node.op_type)
        if counter is None or node.domain not in ("", "ai.onnx"):
            continue
        params = sum(constant(v).size for v in node.inputs[1:] if constant(v) is not None)
        rows.append({
            "name": node.name,
            "op": node.op_type,
            "output_shape": list(static_shape(node.outputs[0]) or []),
            "params": int(params),
            "macs": counter(node),
        })
    return rows


def int8_coverage(model: ir.Model, int8_nodes: Collection[str], why_float: Mapping[str, str]) -> dict[str, Any]:
    """How much of ``model``'s MAC work an int8 artifact runs in int8: ``int8_nodes`` names
    the MAC-bearing nodes it computes with integer kernels; every other one is listed as a
    float layer with its reason from ``why_float`` (by node name). The fraction is what a
    user asking for int8 gets: a model whose convolutions stay float is not an int8 model."""
    layers = [row for row in layer_table(model.graph) if row["macs"]]
    total = sum(row["macs"] for row in layers)
    int8 = sum(row["macs"] for row in layers if row["name"] in int8_nodes)
    return {
        "macs": total,
        "int8_macs": int8,
        "int8_macs_fraction": round(int8 / total, 4) if total else None,
        "float_layers": [{"name": row["name"], "op": row["op"], "macs": row["macs"], "why": why_float.get(row["name"], "not quantized")}
                         for row in layers if row["name"] not in int8_nodes],
    }


def parameter_count(graph: ir.Graph) -> int:
    """Elements of floating-point initializers: the model's learned parameters."""
    return int(sum(
        v.const_value.size for v in graph.initializers.values()
        if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()
    ))


def _io(values) -> list[dict[str, Any]]:
    return [
        {
            "name": v.name,
            "dtype": v.dtype.name.lower() if v.dtype is not None else None,
            "shape": [d if isinstance(d, int) else str(d) for d in v.shape.dims] if v.shape is not None else None,
        }
        for v in values
    ]


def summarize(model: ir.Model) -> dict[str, Any]:
    """Everything ``edgec inspect`` prints, as JSON-able data."""
    layers = layer_table(model.graph)
    known = [row["macs"] for row in layers if row["macs"] is not None]
    return {
        "inputs": _io(model.graph.inputs),
        "outputs": _io(model.graph.outputs),
        "opset": model.opset_imports.get("", None),
        "producer": " ".join(filter(None, [model.producer_name, model.producer_version])) or None,
        "nodes": model.graph.num_nodes(),
        "op_histogram": op_histogram(model.graph),
        "params": parameter_count(model.graph),
        "macs": sum(known),
        "macs_unknown_layers": [row["name"] for row in layers if row["macs"] is None],
        "layers": layers,
    }


def inspect_file(path, input_shapes=None) -> dict[str, Any]:
    """Summarize an ONNX file as given (no folding), with shapes inferred for MAC counts."""
    from pathlib import Path

    from edgec.model import load
    from edgec.passes.canonicalize import FixInputShapes, InferShapes
    from edgec.passes.pipeline import Pipeline

    path = Path(path)
    model, _ = Pipeline([FixInputShapes(input_shapes or {}), InferShapes()])(load(path))
    return {"file": str(path), "size_bytes": path.stat().st_size, **summarize(model)}
