"""Quantization-aware training (finetune step ``qat = true``, edgec.train.qat): the fake
quantizers sit on the runtimes' grids, the values chosen are those int8 gives a range of their
own, the learned ranges reach ORT's QDQ scales and the TFLite quantizer, builds are
deterministic, and the errors a user can cause. Tiny models, one epoch."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from ai_edge_litert import schema_py_generated as tfl_schema
from helpers import GraphBuilder, listing, save
from onnx import numpy_helper
from typer.testing import CliRunner

from edgec.build import BuildOptions, build, canonicalize
from edgec.cli import app
from edgec.errors import OptionError, RecipeError
from edgec.lower.tflite import prepare
from edgec.recipe import Step
from edgec.train.qat import ChannelWeights, fake_quant, quantized_values


def _net():
    """Conv → Relu → Conv → Add (residual join) → Flatten → Gemm → Softmax."""
    g = GraphBuilder(seed=4)
    r = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 2, 3, 3), g.weight(8)], name="conv1", pads=[1, 1, 1, 1])], name="relu")
    x = g.op("Add", [r, g.op("Conv", [r, g.weight(8, 8, 3, 3), g.weight(8)], name="conv2", pads=[1, 1, 1, 1])], name="join")
    x = g.op("Gemm", [g.op("Flatten", [x], name="flatten"), g.weight(4, 8 * 6 * 6, scale=0.05), g.weight(4)], name="fc", transB=1)
    return g.model({"x": [1, 2, 6, 6]}, {g.op("Softmax", [x], name="softmax", axis=1): [1, 4]})


def _outputs(model: ir.Model) -> dict[str, str]:
    """Node name → its output's name."""
    return {node.name: node.outputs[0].name for node in model.graph}


def test_fake_quantizers_sit_on_the_runtimes_grids():
    x = np.linspace(-3, 7, 101, dtype=np.float32)
    low, high = -1.0, 5.0
    scale = (high - low) / 255
    zero = np.round(-low / scale)  # ORT's and TFLite's asymmetric zero point, from the range
    expected = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    np.testing.assert_allclose(fake_quant(x, low, high).numpy(), expected, atol=1e-6)
    kernel = np.random.default_rng(0).standard_normal((3, 3, 4, 5)).astype(np.float32)
    got = ChannelWeights(64, depthwise=False)(kernel, True, {}).numpy()
    per_channel = np.abs(kernel).max(axis=(0, 1, 2)) / 64  # one scale per output channel (last Keras axis)
    np.testing.assert_allclose(got / per_channel, np.round(kernel / per_channel), atol=1e-4)


def test_values_int8_gives_their_own_range():
    model = canonicalize(ir.serde.deserialize_model(_net()), {})[0]
    prepared = prepare(model.clone())[0]
    names, outputs = quantized_values(prepared, {v.name for n in model.graph for v in n.outputs}), _outputs(prepared)
    assert outputs["relu"] in names and outputs["join"] in names and outputs["fc"] in names
    assert outputs["conv1"] not in names  # only a Relu reads it: quantized after the Relu (fused)
    assert outputs["softmax"] not in names  # a graph output
    assert not any(outputs[n] in names for n in outputs if n.startswith("flatten"))  # same scale as its input


def _build(tmp_path, name: str, target: str, lr: float = 1e-3, steps=(), **options):
    source = save(_net(), tmp_path)
    x = np.random.default_rng(1).standard_normal((24, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    step = Step("finetune", {"data": str(tmp_path / "data.npz"), "epochs": 1, "batch_size": 8, "lr": lr, "qat": True})
    return build(source, target, tmp_path / name, BuildOptions(recipe=[*steps, step], calib=str(tmp_path / "data.npz"), precision="int8",
                                                               speed_check=False, min_cosine=0.0, **options))


def test_learned_ranges_become_ort_qdq_scales(tmp_path):
    pruned = Step("prune", {"rate": 0.5, "round_to": 1, "reconstruct": False})  # something for the epoch to recover
    result = _build(tmp_path, "ort", "ort-x86", lr=3e-3, steps=[pruned])
    qat = result.report["finetune"]["qat"]
    assert qat["weights"]["qmax"] == 64 and qat["weights"]["layers"] == 3  # ORT x86's 7-bit weights
    assert result.report["recovery"] == {"skipped": "quantization-aware training"}
    assert result.report["lowering"]["quantization"]["learned_ranges"] >= 2
    model = onnx.load(tmp_path / "ort" / "model.finetuned.onnx")
    join = next(n.output[0] for n in model.graph.node if n.name == "join")
    low, high = qat["ranges"][join]
    assert result.report["finetune"]["best_epoch"] == 1
    assert low < 0 < high and [low, high] != qat["calibrated_ranges"][join]  # trained, not the min/max seen
    quantized = onnx.load(result.artifacts[0])
    scales = [numpy_helper.to_array(i) for i in quantized.graph.initializer if i.name.startswith(join) and "scale" in i.name]
    assert scales and np.isclose(float(scales[0]), (high - low) / 255, rtol=1e-5)


def test_tflite_qat_build_uses_the_ranges_and_is_deterministic(tmp_path):
    first, second = (_build(tmp_path, name, "tflite-x86") for name in ("a", "b"))
    assert (tmp_path / "a" / "model.tflite").read_bytes() == (tmp_path / "b" / "model.tflite").read_bytes()
    record = next(p for p in first.report["lowering"]["passes"] if p["name"] == "learned-activation-ranges")["details"]
    ranges = first.report["finetune"]["qat"]["ranges"]
    assert record["given"] == len(ranges) and record["matched"] == len(ranges)
    graph = tfl_schema.ModelT.InitFromPackedBuf(bytearray((tmp_path / "a" / "model.tflite").read_bytes()), 0).subgraphs[0]
    scales = {round(float(t.quantization.scale[0]), 7) for t in graph.tensors if t.quantization is not None and t.quantization.scale is not None
              and len(t.quantization.scale) == 1}
    assert all(any(np.isclose(s, (high - low) / 255, rtol=1e-4) for s in scales) for low, high in ranges.values())


def test_user_errors(tmp_path):
    with pytest.raises(OptionError, match="fp32 build"):
        build(save(_net(), tmp_path), "ort-x86", tmp_path / "fp32",
              BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "qat": True})]))
    assert listing(tmp_path / "fp32") == []
    with pytest.raises(RecipeError, match="last step"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "qat": True}), Step("prune", {"rate": 0.5})])
    with pytest.raises(OptionError, match="cannot be combined"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "qat": True, "clusters": 4})])
    with pytest.raises(OptionError, match="true or false"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "qat": "yes"})])
    result = CliRunner().invoke(app, ["build", str(tmp_path / "model.onnx"), "-t", "ort-x86", "-o", str(tmp_path / "cli"), "--qat"])
    assert result.exit_code == 2 and "--finetune" in result.output
