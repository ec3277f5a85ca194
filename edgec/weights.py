"""Layer weights as the quantizer sees them: per output channel, whatever the layer type.

Shared by the passes that predict weight rounding (bias correction, the int8 sensitivity
probe) and those that rescale channels (cross-layer equalization).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph import attr


def weight_view(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[group, out_per_group, in_per_group, taps]``, whatever the layer.

    Output channel ``o`` is ``(o // out_per_group, o % out_per_group)`` and input channel
    ``i`` is ``(i // in_per_group, i % in_per_group)``, so per-channel work is one broadcast
    for Conv (any ``group``), Gemm (either ``transB``) and MatMul alike.
    """
    if node.op_type == "Conv":
        group = attr(node, "group", 1)
        return weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)
    matrix = weight if attr(node, "transB", 0) else weight.T  # [out, in]
    return matrix[None, :, :, None]


def weight_from_view(node: ir.Node, view: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`weight_view`."""
    if node.op_type == "Conv":
        return view.reshape(shape)
    matrix = view[0, :, :, 0]
    return matrix if attr(node, "transB", 0) else matrix.T


def quantize_dequantize(view: np.ndarray, qmax: int, per_channel: bool = True) -> np.ndarray:
    """Symmetric round trip of a :func:`weight_view` onto integers in [-qmax, qmax], with a
    scale per output channel or one for the whole tensor."""
    axes = (2, 3) if per_channel else (0, 1, 2, 3)
    scale = np.abs(view).max(axis=axes, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero channel stays zero
    return np.clip(np.rint(view / scale), -qmax, qmax) * scale
