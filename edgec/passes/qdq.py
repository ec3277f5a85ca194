"""Edits of a QDQ graph that keep int8 data in integer where ONNX Runtime would go through float.

ONNX Runtime fuses DequantizeLinear → op → QuantizeLinear into an integer kernel, or drops
the pair around ops that only move data (Transpose, Reshape, MaxPool...). Pad is not among
them (ORT 1.23): every Pad between int8 layers ran in float with a DequantizeLinear before
and a QuantizeLinear after — blazeface's 11 channel pads cost 0.3 of its 1.8 ms in int8.
A Pad whose output is quantized like its input (ORT's quantizer does that for zero, edge
and reflect padding) computes the same integers on the quantized tensor directly.

ORT 1.23's u8s8 QLinearConv on x86 CPUs with AVX-512 VNNI computes wrong outputs (off by up
to 255 levels, at some output columns of the last 8 output channels) when the input channels
are not a multiple of 4 and the output channels are 24 modulo 32 (microsoft/onnxruntime#26324:
ShuffleNet's 3 → 24 first conv; measured here for 1, 2, 3, 5, 6, 7 and 42 input channels by
24, 56, 88, 120, 152 output channels, all exact with 4 or 44 input channels). BlazeFace's
3 → 24 first conv made its all-int8 classificators cosine 0.80 instead of 0.98 on held-out
photos. Zero input channels on the integers (the zero point, i.e. 0.0) and zero weight
columns compute the same convolution in shapes the kernel gets right.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph import add_initializer, attr, constant, sole_consumer


def integer_pads(model: ir.Model) -> int:
    """Run every DequantizeLinear → Pad → QuantizeLinear on the integers; returns how many."""
    graph = model.graph
    return sum(_pad_on_integers(graph, pad) for pad in [n for n in graph if n.op_type == "Pad"])


CHANNEL_MULTIPLE = 4  # input channels the x86 kernel needs: a multiple of this...
BROKEN_OUTPUT_CHANNELS = (32, 24)  # ...when the output channels are 24 modulo 32


def integer_channel_padding(model: ir.Model) -> int:
    """Pad the input channels of each QDQ Conv whose shape ORT's x86 int8 kernel gets wrong
    (see the module docstring) with zero channels and zero weights; returns how many."""
    graph = model.graph
    return sum(_pad_channels(graph, conv) for conv in [n for n in graph if n.op_type == "Conv"])


def _pad_channels(graph: ir.Graph, conv: ir.Node) -> bool:
    data, weights = (conv.inputs[i].producer() for i in (0, 1))
    if not (_is(data, "DequantizeLinear") and _is(weights, "DequantizeLinear")) or attr(conv, "group", 1) != 1:
        return False
    grid, kernel = _grid(data), constant(weights.inputs[0])
    modulus, broken = BROKEN_OUTPUT_CHANNELS
    if grid is None or kernel is None or kernel.shape[1] % CHANNEL_MULTIPLE == 0 or kernel.shape[0] % modulus != broken:
        return False
    extra = -kernel.shape[1] % CHANNEL_MULTIPLE
    widths = np.zeros((2, len(kernel.shape)), np.int64)
    widths[1, 1] = extra  # pads = all begins, then all ends: only the channel axis grows
    pad = ir.node("Pad", [data.inputs[0], add_initializer(graph, widths.reshape(-1), f"{conv.name}_channel_pads"),
                          add_initializer(graph, np.array(grid[1], grid[2]), f"{conv.name}_channel_pad_value")],
                  name=f"{conv.name}_channel_pad")
    pad.outputs[0].dtype = ir.DataType.from_numpy(grid[2])
    padded = ir.node("DequantizeLinear", [pad.outputs[0], *data.inputs[1:]], name=f"{conv.name}_channel_dequantize")
    graph.insert_before(conv, [pad, padded])
    conv.replace_input_with(0, padded.outputs[0])
    zeros = np.zeros((kernel.shape[0], extra, *kernel.shape[2:]), kernel.dtype)
    wider = ir.node("DequantizeLinear", [add_initializer(graph, np.concatenate([kernel, zeros], axis=1), f"{conv.name}_padded_weight"),
                                         *weights.inputs[1:]], attributes={"axis": attr(weights, "axis", 1)},
                    name=f"{conv.name}_padded_weight_dequantize")
    graph.insert_before(conv, wider)
    conv.replace_input_with(1, wider.outputs[0])
    if not weights.outputs[0].uses():
        graph.remove(weights, safe=True)
    return True


def _pad_on_integers(graph: ir.Graph, pad: ir.Node) -> bool:
    dequantize = pad.inputs[0].producer()
    quantize = sole_consumer(pad.outputs[0])
    if not (_is(dequantize, "DequantizeLinear") and _is(quantize, "QuantizeLinear")) or attr(pad, "pads") is not None:
        return False  # (opset < 11 Pads keep their padding value in an attribute; left alone)
    grid = _grid(dequantize)
    if grid is None or grid != _grid(quantize) or quantize.outputs[0].is_graph_output():
        return False
    padding = _integer_padding_value(pad, *grid)
    if padding is None:
        return False
    pad.replace_input_with(0, dequantize.inputs[0])
    if attr(pad, "mode", "constant") == "constant":
        _set_padding_value(graph, pad, padding)
    pad.outputs[0].dtype = ir.DataType.from_numpy(grid[2])
    ir.convenience.replace_all_uses_with(quantize.outputs[0], pad.outputs[0])
    graph.remove(quantize, safe=True)
    if not dequantize.outputs[0].uses():
        graph.remove(dequantize, safe=True)
    return True


def _is(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _grid(node: ir.Node) -> tuple[float, int, np.dtype] | None:
    """(scale, zero point, integer type) of a per-tensor Quantize/DequantizeLinear, else None."""
    scale = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    zero = constant(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return float(scale.item()), int(zero.item()), zero.dtype


def _integer_padding_value(pad: ir.Node, scale: float, zero: int, dtype: np.dtype) -> np.ndarray | None:
    """The padding value on the integer grid, or None if it is not exactly on it."""
    value = constant(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] is not None else np.float32(0)
    if value is None or value.size != 1:
        return None
    level = np.round(float(value.item()) / scale) + zero
    info = np.iinfo(dtype)
    if not info.min <= level <= info.max or np.float32((level - zero) * scale) != np.float32(value.item()):
        return None
    return np.array(level, dtype=dtype)


def _set_padding_value(graph: ir.Graph, pad: ir.Node, padding: np.ndarray) -> None:
    if len(pad.inputs) < 3:
        pad.resize_inputs(3)
    pad.replace_input_with(2, add_initializer(graph, padding, f"{pad.name}_integer_value"))
