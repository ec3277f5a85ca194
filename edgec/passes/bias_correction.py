"""Empirical bias correction: cancel the mean output shift that weight rounding causes.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
empirical variant. Quantizing a weight ``W`` to ``W + ΔW`` shifts a layer's expected output
by ``ΔW · E[x]``; rounding errors do not average out per channel, and the shift is passed on
(and amplified) by every later layer. Subtracting it from the bias removes it on average, at
no run-time cost. ``E[x]`` comes from running the fp32 model on calibration samples.

The weight error is predicted with the scheme the backends apply: symmetric, per output
channel, ``scale = max|w_c| / qmax``, round to nearest, clip (ONNX Runtime's
QDQ per-channel weights and the TFLite converter's). The pass itself leaves the weights in
fp32; quantization comes later.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.activations import activations
from edgec.graph import attr, constant, set_bias, sole_consumer
from edgec.passes.pipeline import PassOutcome
from edgec.verify import Sample
from edgec.weights import quantize_dequantize, weight_view
CORRECTED_OPS = ("Conv", "Gemm", "MatMul")


class BiasCorrection(ir.passes.InPlacePass):
    """Subtract the expected quantization shift ``ΔW · E[x]`` from every Conv/Gemm bias.

    ``calibration`` holds samples keyed by graph input name, shaped like the inputs.
    ``weight_qmax`` is the largest integer weight the backend uses (127; 64 where ONNX
    Runtime reduces the range to 7 bits), ``per_channel`` whether it scales weights per
    output channel or per tensor.
    ``E[x]`` is a plain per-channel mean over all positions: for a padded Conv the border
    taps really see zeros, so the correction there is approximate. A layer without a bias
    gets one. A MatMul is corrected only through the constant bias of the Add after it;
    without one it is skipped, since a new Add would cost a requantized op in int8 graphs.

    Record: ``weight_qmax``, ``samples``, ``mean_abs_shift`` (per corrected layer, the mean
    |shift| subtracted from its bias) and ``skipped`` (layer → why not).
    """

    name = "bias-correction"

    def __init__(self, calibration: Sequence[Sample], weight_qmax: int = 127, per_channel: bool = True) -> None:
        if len(calibration) == 0:
            raise ValueError("BiasCorrection needs at least one calibration sample.")
        if weight_qmax < 1:
            raise ValueError(f"weight_qmax must be at least 1, got {weight_qmax}.")
        self.calibration = calibration
        self.weight_qmax = weight_qmax
        self.per_channel = per_channel

    def call(self, model: ir.Model) -> PassOutcome:
        layers, skipped = _layers(model.graph)
        means = _input_means(model, layers, self.calibration)
        corrected = {}
        for node in layers:
            shift = _expected_shift(node, means[_input_key(node)], self.weight_qmax, self.per_channel)
            _subtract_from_bias(model.graph, node, shift)
            corrected[node.name] = float(f"{np.abs(shift).mean():.4g}")
        return PassOutcome(model, bool(layers), {
            "weight_qmax": self.weight_qmax,
            "per_channel": self.per_channel,
            "samples": len(self.calibration),
            "mean_abs_shift": corrected,
            "skipped": skipped,
        })


def _layers(graph: ir.Graph) -> tuple[list[ir.Node], dict[str, str]]:
    """The layers to correct, and the constant-weight ones that cannot be, with why."""
    layers, skipped = [], {}
    for node in graph:
        if node.op_type not in CORRECTED_OPS or node.domain not in ("", "ai.onnx") or constant(node.inputs[1]) is None:
            continue
        reason = _why_not(node)
        if reason:
            skipped[node.name] = reason
        else:
            layers.append(node)
    return layers, skipped


def _why_not(node: ir.Node) -> str | None:
    if node.op_type == "MatMul":
        if constant(node.inputs[1]).ndim != 2:
            return "weight is not a matrix"
        return None if _matmul_bias(node) else "no Add of a constant bias follows"
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
        return "bias is not a constant"
    return None


def _matmul_bias(matmul: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add after ``matmul`` and the index of its per-output-column constant."""
    out, add = matmul.outputs[0], sole_consumer(matmul.outputs[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    index = 1 - add.inputs.index(out)
    bias = constant(add.inputs[index])
    columns = constant(matmul.inputs[1]).shape[1]
    return (add, index) if bias is not None and bias.size == columns and bias.shape[-1] == columns else None


def _input_key(node: ir.Node) -> tuple[str, int]:
    """The input tensor's name and its channel axis."""
    if node.op_type == "Gemm":
        return node.inputs[0].name, 0 if attr(node, "transA", 0) else 1
    return node.inputs[0].name, 1 if node.op_type == "Conv" else -1


def _input_means(model: ir.Model, layers: list[ir.Node], calibration: Sequence[Sample]) -> dict[tuple[str, int], np.ndarray]:
    """Per-channel mean of each layer input over all samples."""
    if not layers:
        return {}
    keys = {_input_key(node) for node in layers}
    sums = dict.fromkeys(keys, 0.0)
    for values in activations(model, [node.inputs[0] for node in layers], calibration):
        for name, axis in keys:
            x = np.moveaxis(np.asarray(values[name], np.float64), axis, 0)
            sums[name, axis] = sums[name, axis] + x.reshape(x.shape[0], -1).mean(axis=1)
    return {key: total / len(calibration) for key, total in sums.items()}


def _expected_shift(node: ir.Node, mean: np.ndarray, qmax: int, per_channel: bool) -> np.ndarray:
    """``ΔW · E[x]`` per output channel: summed over the input channels of each output's
    group and over kernel taps."""
    view = weight_view(node, constant(node.inputs[1]).astype(np.float64))
    error = quantize_dequantize(view, qmax, per_channel) - view
    groups, _, per_group, _ = view.shape
    shift = (error * mean.reshape(groups, 1, per_group, 1)).sum(axis=(2, 3)).reshape(-1)
    return shift * attr(node, "alpha", 1.0)  # Gemm's alpha scales A·B; 1 for Conv and MatMul


def _subtract_from_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    dtype = constant(node.inputs[1]).dtype
    if node.op_type == "MatMul":
        add, index = _matmul_bias(node)
        bias = constant(add.inputs[index])
        set_bias(graph, add, index, (bias - shift.reshape(bias.shape)).astype(bias.dtype))
        return
    current = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0.0
    if node.op_type == "Gemm":  # its bias is beta·C: fold beta in and set it to 1
        current = attr(node, "beta", 1.0) * np.asarray(current, np.float64)
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    set_bias(graph, node, 2, (current - shift).astype(dtype))
