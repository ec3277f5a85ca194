"""Layers as linear maps on rows of data, so their weights can be re-fitted by least squares.

Channel pruning with reconstruction (He et al. 2017, ThiNet) and data-aware factorization
both re-fit a layer's weights so its outputs on calibration data match the original's. Any
Conv (group 1), Gemm or MatMul is ``rows(y) = patches(x) @ matrix.T + bias`` where
``matrix`` is the weight as ``[out, in·taps]`` (:func:`edgec.weights.weight_view`'s order:
input channel, then kernel row, then kernel column), so one solver serves all three.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph import attr, static_shape


def patches(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The layer input ``x`` as rows of features: ``[samples·positions, in·taps]``."""
    if node.op_type == "Conv":
        return _conv_patches(node, x)
    if node.op_type == "Gemm":
        return x.T if attr(node, "transA", 0) else x
    return x.reshape(-1, x.shape[-1])  # MatMul


def output_rows(node: ir.Node, y: np.ndarray) -> np.ndarray:
    """The layer output ``y`` as ``[samples·positions, out]``, in :func:`patches`' row order."""
    if node.op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def least_squares(a: np.ndarray, b: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """``x`` minimizing ``|a·x − b|² + λ|x|²`` with ``λ = ridge · mean(diag(aᵀa))``.

    Normal equations in float64: the rows are many (positions × samples) and the features
    few, so ``aᵀa`` is small. The ridge, relative to the data's scale, keeps channels that
    are constant on the calibration data (dead ReLUs) from making the system singular.
    """
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ridge_solve(a64.T @ a64, a64.T @ b64, ridge)


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """:func:`least_squares` from ``gram = aᵀa`` and ``rhs = aᵀb``, for callers that have
    those without the rows (``gram`` is not modified)."""
    scale = ridge * max(float(np.mean(np.diag(gram))), 1e-12)
    return np.linalg.solve(gram + scale * np.eye(len(gram)), rhs)


def _conv_patches(node: ir.Node, x: np.ndarray) -> np.ndarray:
    if attr(node, "group", 1) != 1:
        raise ValueError(f"{node.name}: grouped convolutions are fitted per group, not as one matrix")
    kernel = static_shape(node.inputs[1])[2:]
    if len(kernel) != 2:
        raise ValueError(f"{node.name}: only 2-D convolutions are supported, not {len(kernel)}-D")
    strides = attr(node, "strides", [1, 1])
    dilations = attr(node, "dilations", [1, 1])
    padded = np.pad(x, [(0, 0), (0, 0), *_pads(node, x.shape[2:], kernel, strides, dilations)])
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, oh, ow, kh, kw = windows.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def _pads(node: ir.Node, size, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis, from ``pads`` or ``auto_pad``."""
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        pads = attr(node, "pads", [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
        return [(pads[0], pads[2]), (pads[1], pads[3])]
    result = []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        result.append((small, large) if auto == "SAME_UPPER" else (large, small))
    return result
