"""int8 quantization on the ONNX graph: schemes from targets, sensitivity-guided mixed
precision, output heads, already-quantized models, the speed check and calibration sources."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import REPO
from helpers import GraphBuilder, save
from typer.testing import CliRunner

from edgec.build import BuildOptions, build
from edgec.cli import app
from edgec.errors import DeviceError, QuantizationError, TargetError
from edgec.model import load, to_bytes
from edgec.passes import quantize as quantize_module
from edgec.analysis import layer_table
from edgec.passes.quantize import (AccuracyGoal, Candidate, PrecisionSearch, QuantizeStatic, QuantScheme, Ranking, calibrate,
                                    to_qdq, with_shapes)
from edgec.targets import load_target, same_arch
from edgec.verify import random_inputs, run_all
from edgec.runtime import TensorSpec
from edgec.runtime.ort import OrtRunner


def conv(g: GraphBuilder, x: str, cin: int, cout: int, weight=None, name=None) -> str:
    w = g.const(weight) if weight is not None else g.weight(cout, cin, 3, 3)
    return g.op("Conv", [x, w, g.const(np.zeros(cout, np.float32))], pads=[1, 1, 1, 1], name=name)


def outlier_model() -> onnx.ModelProto:
    """conv0 → relu → convA → relu → convB → relu → head. convA's channel 0 is 1000× the
    others and convB ignores it, so one int8 scale for convA's output wipes out everything
    the model computes: the one tensor a mixed-precision search must keep float."""
    g = GraphBuilder(seed=1)
    a_weight = g.rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3
    a_weight[0] *= 1000
    b_weight = g.rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3
    b_weight[:, 0] = 0
    y = g.op("Relu", [conv(g, "x", 3, 8, name="conv0")])
    y = g.op("Relu", [conv(g, y, 8, 8, a_weight, name="convA")])
    y = g.op("Relu", [conv(g, y, 8, 8, b_weight, name="convB")])
    y = conv(g, y, 8, 4, name="head")
    return g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})


def _calibration(count=16):
    return random_inputs([TensorSpec("x", (1, 3, 8, 8), np.dtype(np.float32))], seed=5, count=count)


def _ir(model: onnx.ModelProto, tmp_path):
    return load(save(model, tmp_path))


def test_scheme_comes_from_the_target_file():
    x86, arm = load_target("ort-x86").quantize, load_target("ort-arm").quantize
    assert (x86.activations, x86.weights, x86.reduce_range) == ("uint8", "int8", True)
    assert (arm.activations, arm.weights) == ("int8", "int8")
    assert x86.weight_qmax == 64 and arm.weight_qmax == 127


@pytest.mark.parametrize(("table", "fragment"), [
    ({"activations": "int4"}, "activations must be one of"),
    ({"method": "median"}, "Unknown calibration method"),
    ({"percentile": 120}, "percentile"),
    ({"per_chanel": True}, "Unknown [quantize] keys ['per_chanel']"),
])
def test_bad_quantize_table_is_a_target_error(tmp_path, table, fragment):
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    path = tmp_path / "t.toml"
    path.write_text(f'name = "t"\nbackend = "ort"\narch = "x86_64"\n[quantize]\n{lines}\n')
    with pytest.raises(TargetError, match="t.toml") as info:
        load_target(str(path))
    assert fragment in str(info.value)


def test_full_quantization_keeps_output_heads_float(tmp_path):
    result = QuantizeStatic(_calibration(), QuantScheme())(_ir(outlier_model(), tmp_path))
    assert result.details["output_heads"] == ["head"]
    assert result.details["quantized_ops"]["Conv"] == 3
    ops = [n.op_type for n in result.model.graph]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 3


def test_sensitivity_ranks_the_outlier_tensors_first(tmp_path):
    """Measured with the rest quantized: sparing convA's output, or the Relu after it that
    carries the same range, is what restores the model; nothing else helps."""
    proto = outlier_model()
    scheme = QuantScheme()
    ranking = Ranking(proto, calibrate(proto, _calibration().batches, scheme), scheme, _calibration(4))()
    convA_output = next(n.output[0] for n in proto.graph.node if n.name == "convA")
    relu_output = next(n.output[0] for n in proto.graph.node if list(n.input) == [convA_output])
    assert {c.tensor for c in ranking[:2]} == {convA_output, relu_output}, [(c.tensor, round(c.gain, 3)) for c in ranking[:4]]
    assert min(c.gain for c in ranking[:2]) > 10 * max(abs(c.gain) for c in ranking[2:])


def test_mixed_precision_keeps_only_what_the_goal_needs_float(tmp_path):
    model = _ir(outlier_model(), tmp_path)
    plain = QuantizeStatic(_calibration(), QuantScheme(), goal=AccuracyGoal(0.0))(model.clone())
    assert plain.details["search"][0]["passed"] and plain.details["kept_float"] == []
    worst = min(plain.details["search"][0]["cosine"].values())
    assert worst < 0.9, "the outlier model must be wrecked by full int8 for this test to mean anything"
    mixed = QuantizeStatic(_calibration(), QuantScheme(), goal=AccuracyGoal(0.995))(model.clone())
    final = mixed.details["search"][-1] if mixed.details["search"][-1]["passed"] else next(
        s for s in reversed(mixed.details["search"]) if s["passed"])
    assert min(final["cosine"].values()) >= 0.995
    assert "convA" in mixed.details["kept_float"]
    assert mixed.details["quantized_ops"].get("Conv", 0) >= 1  # conv0 (at least) stays int8


def test_search_runs_each_distinct_artifact_once():
    """Keeping float a node that is float anyway (the output head) gives the same file as
    before: the search records the step, marked as such, without running that file again."""
    proto, scheme, samples = outlier_model(), QuantScheme(), _calibration(4)
    ranges, shaped = calibrate(proto, samples.batches, scheme), with_shapes(proto)
    opened = []

    def runner(content: bytes) -> OrtRunner:
        opened.append(content)
        return OrtRunner(content, threads=1)

    reference = run_all(OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled"), samples.batches)
    search = PrecisionSearch(reference, samples, lambda keep: to_qdq(shaped, ranges, scheme, sorted(keep | {"head"})).SerializeToString(),
                             runner)
    # The head's claimed worth makes it the first step alone; it changes nothing, so the next step is twice as long.
    ranking = [Candidate("head-out", 1.0, ("head",)), Candidate("a-out", 0.0, ("convA",)), Candidate("b-out", 0.0, ("convB",))]
    kept = search.run(AccuracyGoal(0.995), lambda floated: [c for c in ranking if c.tensor not in floated])
    assert "convA" in kept
    assert [s.get("same_artifact_as_check") for s in search.steps[:2]] == [None, 0]
    assert len(opened) == len(set(opened)) == len(search.steps) - sum("same_artifact_as_check" in s for s in search.steps)


def test_search_takes_back_to_int8_the_float_layers_the_goal_does_without(tmp_path):
    """A ranking that puts conv0 (harmless in int8) before convA's output: both float pass,
    and the search then takes conv0 back to int8 since the goal holds without it."""
    proto, scheme, calibration = outlier_model(), QuantScheme(), _calibration()
    ranges, shaped = calibrate(proto, calibration.batches, scheme), with_shapes(proto)
    reference = run_all(OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled"), calibration.batches)

    def artifact(keep: set[str]) -> bytes:
        return to_qdq(shaped, ranges, scheme, sorted(keep | {"head"})).SerializeToString()

    convA = next(n for n in proto.graph.node if n.name == "convA")
    relu = next(n.name for n in proto.graph.node if list(n.input) == [convA.output[0]])
    spared = ("convA", relu, "convB")  # convA's range reaches convB through the Relu
    ranking = [Candidate("conv0 weight", 0.1, ("conv0",)), Candidate(convA.output[0], 1.0, spared)]
    macs = {row["name"]: row["macs"] for row in layer_table(load(save(proto, tmp_path)).graph)}
    search = PrecisionSearch(reference, calibration, artifact, lambda content: OrtRunner(content, threads=1), macs)
    assert search.run(AccuracyGoal(0.995), lambda kept: [c for c in ranking if c.tensor not in kept]) == set(spared)
    assert search.steps[-1]["passed"] and search.steps[-1]["back_to_int8"] == "conv0 weight"


def test_unknown_keep_float_name_is_an_error(tmp_path):
    with pytest.raises(QuantizationError, match="nope"):
        QuantizeStatic(_calibration(), QuantScheme(), exclude=["nope"])(_ir(outlier_model(), tmp_path))


def test_callable_calibration_and_int8_onnx_runtime_build(tmp_path):
    """A Python callable as calibration source; the artifact is QDQ-quantized and the report
    records the scheme, the search and the calibration source."""
    path = save(outlier_model(), tmp_path)
    rng = np.random.default_rng(0)

    def samples():
        for _ in range(8):
            yield {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}

    options = BuildOptions(precision="int8", calib=samples, speed_check=False)
    result = build(path, "ort-x86", tmp_path / "out", options)
    assert result.report["calibration"]["source"].startswith("callable samples")
    quantization = result.report["lowering"]["quantization"]
    assert quantization["scheme"]["activations"] == "uint8" and quantization["scheme"]["reduce_range"] is True
    assert "convA" in quantization["kept_float"]
    artifact = onnx.load(result.artifacts[0])
    assert any(n.op_type in ("QLinearConv", "QuantizeLinear") for n in artifact.graph.node)
    assert result.verification.passed


def test_speed_check_ships_the_faster_artifact_and_says_so(tmp_path):
    """Whichever wins on this host, the report's decision matches the artifact shipped."""
    path = save(outlier_model(), tmp_path)
    result = build(path, "ort-x86", tmp_path / "out", BuildOptions(precision="int8", calib=str(_calibration_file(tmp_path))))
    decision = result.report["speed_check"]
    assert decision["measured"] is True and decision["shipped"] == result.report["precision"]
    assert (decision["int8_ms"] < decision["fp32_ms"]) == (decision["shipped"] == "int8")
    quantized = any(n.op_type.startswith("QLinear") or n.op_type == "QuantizeLinear"
                    for n in onnx.load(result.artifacts[0]).graph.node)
    assert quantized == (decision["shipped"] == "int8")
    int8 = result.report["int8"]  # never int8 MACs in a shipped fp32 artifact
    assert int8["shipped"] == decision["shipped"]
    assert int8["int8_macs_fraction"] == (int8["int8_artifact"]["int8_macs_fraction"] if quantized else 0.0)


def test_speed_check_is_skipped_for_another_architecture(tmp_path):
    path = save(outlier_model(), tmp_path)
    with pytest.warns(UserWarning, match="Calibrating with random inputs"):
        result = build(path, "ort-arm", tmp_path / "out", BuildOptions(precision="int8", min_cosine=0.0))
    assert result.report["speed_check"]["measured"] is False
    assert result.report["precision"] == "int8"


def test_already_quantized_model_is_refused(tmp_path):
    path = save(outlier_model(), tmp_path)
    with pytest.warns(UserWarning, match="Calibrating with random inputs"):
        first = build(path, "ort-x86", tmp_path / "q", BuildOptions(precision="int8", speed_check=False, min_cosine=0.0))
    quantized = first.artifacts[0]
    result = CliRunner().invoke(app, ["build", str(quantized), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--precision", "int8"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "already quantized" in text and "float model" in text and "Traceback" not in text


def test_bias_correction_reduces_int8_error_on_mobilenetv2(tmp_path):
    """With and without bias correction, same calibration: ORT's 7-bit weights shift each
    layer's mean output, and correcting it lowers the int8 error on held-out digits."""
    entry = REPO / "models" / "mobilenetv2.onnx"
    data = dict(inputs=str(REPO / "models/data/digits_eval_nchw.npz"), calib=str(REPO / "models/data/digits_calib_nchw.npz"),
                precision="int8", speed_check=False, equalize=False)
    plain = build(entry, "ort-x86", tmp_path / "plain", BuildOptions(**data, bias_correction=False))
    corrected = build(entry, "ort-x86", tmp_path / "bc", BuildOptions(**data, bias_correction=True))
    before, after = plain.verification.outputs[0], corrected.verification.outputs[0]
    assert after.mean_abs_error < 0.8 * before.mean_abs_error, (before.mean_abs_error, after.mean_abs_error)
    assert after.cosine > before.cosine
    assert any(r["name"] == "bias-correction" for r in corrected.report["passes"])


def test_bias_correction_is_kept_only_when_it_measures_better(tmp_path):
    """By default both variants are lowered and measured; the report says which won and why."""
    options = BuildOptions(calib=str(REPO / "models/data/digits_calib_nchw.npz"), precision="int8", speed_check=False,
                           inputs=str(REPO / "models/data/digits_eval_nchw.npz"))
    result = build(REPO / "models" / "mobilenetv2.onnx", "ort-x86", tmp_path / "out", options)
    decision = result.report["recovery"]["bias_correction"]
    errors = decision["int8_error"]
    assert decision["applied"] == (errors["with"] < errors["without"])
    assert decision["applied"] == any(r["name"] == "bias-correction" for r in result.report["passes"])
    assert result.report["recovery"]["equalization"] == {"applied": False}  # per-channel weights


def padded_model() -> onnx.ModelProto:
    """conv → relu → zero Pad → conv → relu → Pad with 0.37 → head: the first pad's output
    shares its input's int8 grid, the second's (0.37 is off that grid) does not."""
    g = GraphBuilder(seed=3)
    y = g.op("Relu", [conv(g, "x", 3, 8, name="conv0")])
    y = g.op("Pad", [y, g.const(np.array([0, 1, 1, 1, 0, 1, 1, 1], np.int64))], name="zero_pad")
    y = g.op("Relu", [conv(g, y, 10, 8, name="conv1")])
    y = g.op("Pad", [y, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), g.const(np.array(0.37, np.float32))],
             name="value_pad")
    y = conv(g, y, 8, 4, name="head")
    return g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 12, 12]})


@pytest.mark.parametrize("scheme", [QuantScheme(), load_target("ort-x86").quantize])
def test_pads_between_int8_layers_run_on_the_integers(tmp_path, monkeypatch, scheme):
    """ONNX Runtime runs DequantizeLinear → Pad → QuantizeLinear in float; edgec pads the
    integers instead when that gives the same integers, and leaves other Pads alone."""
    model, feeds = _ir(padded_model(), tmp_path), _calibration(4).batches
    result = QuantizeStatic(_calibration(), scheme)(model.clone())
    producers = {n.name: n.inputs[0].producer().op_type for n in result.model.graph if n.op_type == "Pad"}
    assert producers == {"zero_pad": "QuantizeLinear", "value_pad": "DequantizeLinear"}
    monkeypatch.setattr(quantize_module, "integer_pads", lambda model: 0)
    in_float = QuantizeStatic(_calibration(), scheme)(model.clone())
    for batch in feeds:
        got, expected = (OrtRunner(to_bytes(r.model), threads=1, optimization="disabled").run(batch) for r in (result, in_float))
        for name, array in expected.items():
            np.testing.assert_array_equal(got[name], array)


def rgb_stem_model() -> onnx.ModelProto:
    """A 3 → 24 channel conv on a 64-wide image (BlazeFace's stem) → relu → head."""
    g = GraphBuilder(seed=4)
    y = g.op("Relu", [conv(g, "x", 3, 24, name="stem")])
    y = conv(g, y, 24, 4, name="head")
    return g.model({"x": [1, 3, 64, 64]}, {y: [1, 4, 64, 64]})


def test_convs_the_x86_int8_kernel_gets_wrong_get_zero_input_channels(tmp_path, monkeypatch):
    """ORT 1.23's x86 QLinearConv miscomputes 3 → 24 channels on AVX-512 VNNI CPUs (up to
    255 levels off); with the input channels padded to 4 on the integers the fused kernels
    match ORT's float evaluation of the same QDQ graph, which the padding leaves unchanged."""
    specs = [TensorSpec("x", (1, 3, 64, 64), np.dtype(np.float32))]
    calibration, scheme = random_inputs(specs, seed=5, count=4), load_target("ort-x86").quantize
    model = _ir(rgb_stem_model(), tmp_path)
    padded = to_bytes(QuantizeStatic(calibration, scheme)(model.clone()).model)
    assert "stem_channel_pad" in {n.name for n in onnx.load_from_string(padded).graph.node}
    monkeypatch.setattr(quantize_module, "integer_channel_padding", lambda model: 0)
    plain = to_bytes(QuantizeStatic(calibration, scheme)(model.clone()).model)
    for batch in calibration.batches:
        reference = OrtRunner(plain, threads=1, optimization="disabled").run(batch)
        for level in ("disabled", "all"):
            got = OrtRunner(padded, threads=1, optimization=level).run(batch)
            for name, array in reference.items():
                np.testing.assert_allclose(got[name], array, atol=0.01 * np.abs(array).max())


@pytest.mark.parametrize(("machine", "arch", "same"), [
    ("aarch64", "arm64", True), ("arm64", "arm64", True), ("x86_64", "x86_64", True), ("AMD64", "x86_64", True),
    ("x86_64", "arm64", False), ("aarch64", "x86_64", False),
])
def test_machine_names_match_target_architectures(machine, arch, same):
    assert same_arch(machine, arch) is same


def test_speed_check_on_a_device_of_another_architecture_is_refused(tmp_path):
    host = "x86_64" if same_arch(platform.machine(), "x86_64") else "arm64"
    target = next(t for t in ("tflite-arm", "tflite-x86") if load_target(t).arch != host)
    with pytest.raises(DeviceError, match="cannot check the target's int8 speed"):
        build(save(outlier_model(), tmp_path), target, tmp_path / "out",
              BuildOptions(precision="int8", calib=str(_calibration_file(tmp_path)), speed_device="local"))
    assert not (tmp_path / "out").exists()


def _calibration_file(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path


def test_commands_import_ort_quantization_only_to_quantize(tmp_path):
    """ONNX Runtime's quantization package imports torch wherever torch is installed (3-5 s):
    an fp32 build, `edgec profile` or `edgec inspect` must not pay for it."""
    probe = ("import sys, edgec.cli, edgec.lower.tflite; from edgec.build import BuildOptions, build; "
             f"build({str(REPO / 'models' / 'mlp.onnx')!r}, 'ort-x86', {str(tmp_path / 'out')!r}, BuildOptions()); "
             "print(sorted(m for m in ('onnxruntime.quantization', 'torch') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout


@pytest.mark.parametrize("zero", [np.uint8(128), np.int8(-3)])
def test_the_arithmetic_probe_quantizes_as_quantize_linear_does(zero):
    """Opset 23 models have no QuantizeLinear kernel in ONNX Runtime 1.23, so the precision
    search's probe spells it out; both forms give the same grid, rounding ties to even."""
    x = np.concatenate([np.linspace(-3, 3, 997), np.array([0.5, 1.5, -2.5, 40.0, -40.0])]).astype(np.float32).reshape(1, -1)
    outputs = []
    for arithmetic in (False, True):
        nodes = quantize_module._fake_quant("x", 0.05, np.asarray(zero), arithmetic)
        graph = onnx.helper.make_graph(nodes, "probe", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
                                       [onnx.helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, x.shape)])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23 if arithmetic else 21)])
        model.ir_version = 10
        outputs.append(OrtRunner(model.SerializeToString(), threads=1).run({"x": x})[nodes[-1].output[0]])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_ops_touching_an_infinite_mask_stay_float_in_int8_tflite(tmp_path):
    """A causal mask of -inf (ONNX's own Attention test, built int8 on its inputs) gave its
    ops an int8 scale of ~1e36, and LiteRT's XNNPACK delegate aborted the process loading
    the model; those ops now stay float."""
    from edgec.bench.node_tests import _test_data, node_test_dirs

    (test,) = node_test_dirs(["test_attention_4d_attn_mask_3d_causal"])[:1]
    inputs, _, _ = _test_data(test)
    np.savez(tmp_path / "inputs.npz", **inputs)
    data = str(tmp_path / "inputs.npz")
    result = build(test / "model.onnx", "tflite-x86", tmp_path / "out",
                   BuildOptions(precision="int8", calib=data, inputs=data, speed_check=False, min_cosine=0.0))
    assert result.report["lowering"]["kept_float_for_infinite_ranges"] >= 1 and result.verification.passed


@pytest.mark.skipif(not same_arch(platform.machine(), "x86_64"), reason="the speed check times tflite-x86 on an x86 host")
def test_the_speed_check_times_on_the_builds_own_data(tmp_path):
    """It timed both artifacts on random data, whose integers are 0 or 1: an integer Div
    stopped LiteRT ("data[i] != 0 was not true"), an internal error."""
    from helpers import DIVIDENDS, DIVISORS, binary_op

    np.savez(tmp_path / "data.npz", x=np.array(DIVIDENDS, np.int32), d=np.array(DIVISORS, np.int32))
    data = str(tmp_path / "data.npz")
    result = build(save(binary_op("Div", onnx.TensorProto.INT32), tmp_path), "tflite-x86", tmp_path / "out",
                   BuildOptions(precision="int8", calib=data, inputs=data))
    assert result.report["int8"]["shipped"] in ("int8", "fp32") and result.report["speed_check"]["measured"]


def test_a_scalar_input_calibrates_for_onnx_runtime(tmp_path):
    """A scalar input takes one value per batch ([N]; it had to be exactly one value), and its
    batches are arrays: numpy scalars, ONNX Runtime's calibrators passed on to a session that
    refuses them ("Unable to handle object of type numpy.float32")."""
    g = GraphBuilder()
    y = g.op("Relu", [g.op("Mul", [g.op("MatMul", ["x", g.weight(4, 4)]), "gain"])])
    model = g.model({"x": [1, 4], "gain": []}, {y: [1, 4]})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((8, 4)).astype(np.float32), gain=np.linspace(0.5, 2, 8).astype(np.float32))
    data = str(tmp_path / "data.npz")
    result = build(save(model, tmp_path), "ort-x86", tmp_path / "out", BuildOptions(precision="int8", calib=data, inputs=data,
                                                                                   speed_check=False, min_cosine=0.0))
    assert result.verification.passed


def test_onnx_runtime_int8_of_an_opset_23_model_says_why_it_cannot(tmp_path):
    """It failed on a QuantizeLinear node the user never wrote (ONNX Runtime 1.23 has no
    kernel for opset 23's); TFLite builds it in int8."""
    g = GraphBuilder()
    y = g.op("Relu", [g.op("MatMul", ["x", g.weight(4, 4)])])
    path = save(g.model({"x": [1, 4]}, {y: [1, 4]}, opset=23), tmp_path)
    with pytest.raises(QuantizationError, match="has no int8 QuantizeLinear kernel for models past opset 22"):
        build(path, "ort-x86", tmp_path / "ort", BuildOptions(precision="int8", speed_check=False))
    assert build(path, "tflite-x86", tmp_path / "tflite", BuildOptions(precision="int8", speed_check=False)).verification.passed
