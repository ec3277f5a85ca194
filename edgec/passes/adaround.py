"""AdaRound: learn, per layer, whether each weight rounds up or down, on calibration data.

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (AIMET's
technique). Rounding every weight to its nearest int8 value minimizes the weight error, not
the layer's output error; AdaRound chooses up or down per weight so the layer's output on
real inputs moves least. Each weight is ``s·(⌊w/s⌋ + h(V))`` with ``h`` the rectified sigmoid;
``V`` is fitted by Adam to the layer's float output on its calibration inputs, with a
regularizer (exponent annealed from 20 to 2) that drives every ``h`` to 0 or 1. No labels.

The pass writes the rounded weights back as floats on the backends' per-channel grid
(symmetric, ``scale = max|w_c| / qmax``, the weights' extremes kept), so ONNX Runtime's and
TFLite's quantizers recompute the same scale and reproduce these integers exactly. Layer
inputs come from the float model (one run for all layers, which bounds the cost).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.activations import capture
from edgec.graph import attr, constant, replace_initializer_data
from edgec.passes.pipeline import PassOutcome
from edgec.verify import Sample
from edgec.weights import weight_from_view, weight_view

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
ROWS = 1024  # input rows (im2col patches) a layer is fitted on, sampled from the calibration data
BATCH = 256  # rows per Adam step
WARMUP = 0.2  # fraction of the steps fitted without the regularizer
LEARNING_RATE = 0.1


class AdaRound(ir.passes.InPlacePass):
    """Snap every Conv (2-D) / Gemm weight to the int8 value AdaRound chooses.

    Record: per layer, the output MSE on its fitting rows with nearest rounding and with the
    learned one (``mse``), and ``skipped`` (layer → why not).
    """

    name = "adaround"

    def __init__(self, calibration: Sequence[Sample], weight_qmax: int = 127, iterations: int = 300,
                 weight: float = 1.0, seed: int = 0) -> None:
        if len(calibration) == 0:
            raise ValueError("AdaRound needs at least one calibration sample.")
        self.calibration, self.qmax, self.iterations, self.weight, self.seed = calibration, weight_qmax, iterations, weight, seed

    def call(self, model: ir.Model) -> PassOutcome:
        layers, skipped = _layers(model.graph)
        inputs = capture(model, {node.inputs[0] for node in layers}, self.calibration) if layers else {}
        rng = np.random.default_rng(self.seed)
        errors = {}
        for node in layers:
            rows = _rows(node, inputs[node.inputs[0].name], rng)
            weight = constant(node.inputs[1])
            view = weight_view(node, weight.astype(np.float64))
            rounded, errors[node.name] = adaround(view, rows, self.qmax, self.iterations, self.weight, rng)
            replace_initializer_data(node.inputs[1], weight_from_view(node, rounded, weight.shape).astype(weight.dtype))
        return PassOutcome(model, bool(layers), {"weight_qmax": self.qmax, "iterations": self.iterations,
                                                 "mse": errors, "skipped": skipped})


def _layers(graph: ir.Graph) -> tuple[list[ir.Node], dict[str, str]]:
    layers, skipped = [], {}
    for node in graph:
        if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx") or constant(node.inputs[1]) is None:
            continue
        if len(node.inputs[1].uses()) > 1:
            skipped[node.name] = "weight shared with another layer"
        elif node.op_type == "Conv" and constant(node.inputs[1]).ndim != 4:
            skipped[node.name] = "not a 2-D convolution"
        elif node.op_type == "Gemm" and attr(node, "transA", 0):
            skipped[node.name] = "transposed input"
        else:
            layers.append(node)
    return layers, skipped


def _rows(node: ir.Node, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to ``ROWS`` input rows of the layer, drawn at random, as ``[rows, group, in_per_group, taps]``."""
    if node.op_type == "Gemm":
        rows = x.reshape(-1, x.shape[-1])
        return rows[_chosen(len(rows), rng)].reshape(-1, 1, x.shape[-1], 1).astype(np.float64)
    windows = _windows(node, x)  # a strided view: only the chosen patches are copied
    n, c, oh, ow = windows.shape[:4]
    samples, hs, ws = np.unravel_index(_chosen(n * oh * ow, rng), (n, oh, ow))
    patches = windows[samples, :, hs, ws]  # [rows, c, kh, kw]
    group = attr(node, "group", 1)
    return patches.reshape(len(patches), group, c // group, -1).astype(np.float64)


def _chosen(count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(count, ROWS, replace=False)) if count > ROWS else np.arange(count)


def _windows(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The Conv's input patches of an NCHW input, ``[n, c, oh, ow, kh, kw]``, for its kernel,
    strides, dilations and pads."""
    kh, kw = constant(node.inputs[1]).shape[2:]
    sh, sw = attr(node, "strides", [1, 1])
    dh, dw = attr(node, "dilations", [1, 1])
    top, left, bottom, right = attr(node, "pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw]


def _outputs(rows: np.ndarray, view: np.ndarray) -> np.ndarray:
    """[rows, group, out_per_group]: each group's inputs times its weights."""
    flat_rows = rows.reshape(rows.shape[0], rows.shape[1], -1).transpose(1, 0, 2)  # [g, r, k]
    flat_view = view.reshape(view.shape[0], view.shape[1], -1)  # [g, o, k]
    return (flat_rows @ flat_view.transpose(0, 2, 1)).transpose(1, 0, 2)


def adaround(view: np.ndarray, rows: np.ndarray, qmax: int, iterations: int, weight: float,
             rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """The weight (``weight_view`` form) on its per-channel int8 grid with learned rounding,
    and the output MSE on ``rows`` with nearest rounding and with the learned one."""
    scale = np.abs(view).max(axis=(2, 3), keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    floor = np.floor(view / scale)
    fixed = np.abs(view) >= np.abs(view).max(axis=(2, 3), keepdims=True)  # the extremes set the scale: keep them
    fraction = view / scale - floor
    v = -np.log((ZETA - GAMMA) / (np.clip(fraction, 0.01, 0.99) - GAMMA) - 1)  # h(v) = fraction
    target = _outputs(rows, view)
    nearest = scale * np.clip(np.rint(view / scale), -qmax, qmax)
    # The regularizer's weight is relative to the output error of nearest rounding, so one
    # setting fits layers of any output scale.
    weight = weight * np.sum((_outputs(rows, nearest) - target) ** 2) / len(rows)
    m, s = np.zeros_like(v), np.zeros_like(v)
    for step in range(iterations):
        batch = rows[rng.choice(len(rows), min(BATCH, len(rows)), replace=False)]
        sig = 1 / (1 + np.exp(-v))
        h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0, 1)
        soft = scale * np.clip(floor + h, -qmax, qmax)
        error = _outputs(batch, soft) - _outputs(batch, view)
        flat_batch = batch.reshape(batch.shape[0], batch.shape[1], -1).transpose(1, 0, 2)  # [g, r, k]
        grad_w = (2 * error.transpose(1, 2, 0) @ flat_batch / len(batch)).reshape(view.shape)
        warm = step < WARMUP * iterations  # the regularizer starts after a warm-up, as in the paper
        beta = 20 + (2 - 20) * (step - WARMUP * iterations) / max((1 - WARMUP) * iterations, 1)
        edge = 2 * h - 1
        push = 0.0 if warm else weight * beta * np.abs(edge) ** (beta - 1) * np.sign(edge) * 2
        grad_h = grad_w * scale - push
        grad = np.where((h > 0) & (h < 1) & ~fixed, grad_h * sig * (1 - sig) * (ZETA - GAMMA), 0.0)
        m, s = 0.9 * m + 0.1 * grad, 0.999 * s + 0.001 * grad**2
        v -= LEARNING_RATE * (m / (1 - 0.9 ** (step + 1))) / (np.sqrt(s / (1 - 0.999 ** (step + 1))) + 1e-8)
    learned = np.where(fixed, np.rint(view / scale), floor + (v >= 0))
    rounded = scale * np.clip(learned, -qmax, qmax)
    mse = [float(f"{np.mean((_outputs(rows, w) - target) ** 2):.4g}") for w in (nearest, rounded)]
    return (rounded, mse) if mse[1] <= mse[0] else (nearest, mse)
