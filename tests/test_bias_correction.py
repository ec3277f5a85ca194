"""Bias correction: the mean output shift of quantized weights is cancelled, measured in ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import GraphBuilder

from edgec import model as edgec_model
from edgec.build import canonicalize
from edgec.graph import attr, constant, replace_initializer_data
from edgec.passes.bias_correction import BiasCorrection

REPO = Path(__file__).resolve().parent.parent
LAYERS = ("Conv", "Gemm", "MatMul")


def quantize_weights(model: ir.Model, bits: int) -> ir.Model:
    """Weight-only int quantization as the backends do it: symmetric, per output channel."""
    qmax = 2 ** (bits - 1) - 1
    for node in model.graph:
        if node.op_type not in LAYERS:
            continue
        axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attr(node, "transB", 0)) else 0
        weight = np.moveaxis(constant(node.inputs[1]).astype(np.float64), axis, 0)
        scale = np.abs(weight).reshape(len(weight), -1).max(axis=1).reshape((-1,) + (1,) * (weight.ndim - 1)) / qmax
        quantized = np.clip(np.rint(weight / scale), -qmax, qmax) * scale
        replace_initializer_data(node.inputs[1], np.moveaxis(quantized, 0, axis).astype(np.float32))
    return model


def layer_outputs(model: ir.Model, samples: list[dict[str, np.ndarray]], names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Each named value (default: every layer's output) for every sample, stacked:
    ``[sample, *value shape]``."""
    proto = edgec_model.to_proto(model)
    names = names or [n.outputs[0].name for n in model.graph if n.op_type in LAYERS]
    present = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in present)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, sample) for sample in samples]
    return {name: np.stack([run[i] for run in runs]).astype(np.float64) for i, name in enumerate(names)}


def channel_bias(reference: np.ndarray, quantized: np.ndarray, axis: int) -> np.ndarray:
    """Per output channel, the mean over samples and positions of quantized − reference."""
    error = np.moveaxis(quantized - reference, axis, 0)
    return error.reshape(len(error), -1).mean(axis=1)


def mean_biases(reference: dict, quantized: dict) -> np.ndarray:
    """Mean |channel bias| per layer (channels are axis 2 of ``[sample, 1, C, ...]``)."""
    return np.array([np.abs(channel_bias(reference[n], quantized[n], 2)).mean() for n in reference])


def mobilenetv2() -> ir.Model:
    return canonicalize(edgec_model.load(REPO / "models/mobilenetv2.onnx"), {})[0]


@pytest.fixture(scope="module")
def mobilenet():
    """Calibration samples, held-out samples and the fp32 layer outputs on the latter."""
    calib = np.load(REPO / "models/data/digits_calib_nchw.npz")["image"]
    held_out = [{"image": image[None]} for image in np.load(REPO / "models/data/digits_eval_nchw.npz")["image"][:300]]
    return [{"image": image[None]} for image in calib], held_out, layer_outputs(mobilenetv2(), held_out)


def test_correction_reduces_mobilenetv2_output_bias(mobilenet):
    calibration, held_out, reference = mobilenet
    result = BiasCorrection(calibration)(mobilenetv2())
    assert len(result.details["mean_abs_shift"]) == 20 and result.details["skipped"] == {}
    plain = mean_biases(reference, layer_outputs(quantize_weights(mobilenetv2(), 8), held_out))
    corrected = mean_biases(reference, layer_outputs(quantize_weights(result.model, 8), held_out))
    # The first layer sees only its own rounding: its shift is almost entirely removed.
    assert corrected[0] < plain[0] / 5
    # Later layers also inherit noise through ReLU6 that a mean cannot cancel.
    assert corrected.mean() < 0.9 * plain.mean()
    assert (corrected < plain).sum() >= 0.8 * len(plain)


def test_without_rounding_error_nothing_changes(mobilenet):
    calibration, held_out, reference = mobilenet
    result = BiasCorrection(calibration[:8], weight_qmax=2**31 - 1)(mobilenetv2())
    assert max(result.details["mean_abs_shift"].values()) < 1e-8
    outputs = layer_outputs(result.model, held_out[:20])
    for name, values in outputs.items():
        np.testing.assert_allclose(values, reference[name][:20], rtol=1e-5, atol=1e-6)


def exact_layers(g: GraphBuilder):
    """Layers whose output mean is exactly ``W · E[x] + b`` (no padding, no nonlinearity)."""
    grouped = g.op("Conv", ["x", g.weight(6, 2, 1, 1)], name="grouped", group=2)  # no bias
    flat = g.op("Flatten", [g.op("GlobalAveragePool", [grouped])])
    gemm = g.op("Gemm", [flat, g.weight(5, 6), g.weight(5)], name="gemm", transB=1, alpha=1.5, beta=0.5)
    matmul = g.op("MatMul", [gemm, g.weight(5, 3)], name="matmul")
    return [grouped, gemm, g.op("Add", [matmul, g.weight(3)])]


def test_corrected_mean_is_exact_for_linear_layers():
    g = GraphBuilder(seed=4)
    outputs = exact_layers(g)
    proto = g.model({"x": [1, 4, 5, 5]}, dict.fromkeys(outputs))
    rng = np.random.default_rng(0)
    samples = [{"x": (rng.standard_normal((1, 4, 5, 5)) + rng.uniform(0.5, 2, (1, 4, 1, 1))).astype(np.float32)} for _ in range(16)]
    model = ir.serde.deserialize_model(proto)
    outputs_before = [v.name for v in model.graph.outputs]
    reference = layer_outputs(model, samples, outputs)
    plain = layer_outputs(quantize_weights(ir.serde.deserialize_model(proto), 4), samples, outputs)
    result = BiasCorrection(samples, weight_qmax=7)(model)
    assert sorted(result.details["mean_abs_shift"]) == ["gemm", "grouped", "matmul"]
    assert [v.name for v in model.graph.outputs] == outputs_before  # the statistics ran on a copy
    corrected = layer_outputs(quantize_weights(model, 4), samples, outputs)
    for name in reference:
        axis = 2 if reference[name].ndim == 5 else -1
        assert np.abs(channel_bias(reference[name], plain[name], axis)).max() > 1e-3
        np.testing.assert_allclose(channel_bias(reference[name], corrected[name], axis), 0, atol=1e-5)


def test_matmul_without_bias_add_is_skipped():
    g = GraphBuilder()
    y = g.op("Relu", [g.op("MatMul", ["x", g.weight(4, 3)], name="bare")])
    model = ir.serde.deserialize_model(g.model({"x": [2, 4]}, {y: [2, 3]}))
    result = BiasCorrection([{"x": np.ones((2, 4), np.float32)}])(model)
    assert not result.modified
    assert result.details["skipped"] == {"bare": "no Add of a constant bias follows"}


def test_empty_calibration_is_refused():
    with pytest.raises(ValueError, match="calibration sample"):
        BiasCorrection([])
