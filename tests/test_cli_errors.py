"""Every error a user can cause: a one-paragraph message, a non-zero exit, no traceback, and
no artifact left behind."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import numpy as np
import onnx
import pytest
from helpers import DIVIDENDS, DIVISORS, GraphBuilder, binary_op, listing, save
from onnx import TensorProto, helper
from typer.testing import CliRunner

from edgec.cli import app
from edgec.targets import same_arch


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _assert_clean_failure(result, out_dir, *fragments: str, code: int = 2):
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text
    assert "error:" in text
    for fragment in fragments:
        assert fragment in " ".join(text.split()), f"{fragment!r} not in {text!r}"
    assert listing(out_dir) == []


def _tiny_model() -> onnx.ModelProto:
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    return g.model({"x": [1, 4]}, {y: [1, 4]})


def test_missing_file(tmp_path):
    _assert_clean_failure(_cli("build", str(tmp_path / "nope.onnx"), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "No such file")


def test_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a model\n")
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "notes.onnx", "ONNX")


def test_truncated_file(tmp_path):
    g = GraphBuilder()
    y = g.op("Gemm", ["x", g.weight(64, 64)])
    data = g.model({"x": [1, 64]}, {y: [1, 64]}).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "cut.onnx", "truncated")


def test_model_failing_the_checker(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["undefined"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "ONNX checker rejected", "undefined")


def test_a_model_of_only_non_standard_domains_is_named_as_such(tmp_path):
    """ai.onnx.ml and training models import no standard opset; the message said 'opset 0'."""
    node = helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)
    graph = helper.make_graph([node], "ml", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    result = _cli("build", str(save(model, tmp_path)), "-t", "ort-x86", "-o", str(tmp_path / "out"))
    _assert_clean_failure(result, tmp_path / "out", "imports no standard ONNX opset, only ai.onnx.ml")


def test_a_tensorflow_function_call_left_by_tf2onnx_is_explained(tmp_path):
    """tf2onnx leaves tf_keras' XLA-compiled grouped convolutions as PartitionedCall nodes."""
    call = helper.make_node("PartitionedCall", ["x"], ["y"], name="stage_0/depthwise_conv/PartitionedCall")
    graph = helper.make_graph([call], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "keras.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "ONNX checker rejected", "stage_0/depthwise_conv/PartitionedCall",
                          "groups > 1", "DepthwiseConv2D")


def test_unsupported_op_names_op_node_target_and_suggests_ort(tmp_path):
    g = GraphBuilder()
    y = g.op("Det", ["x"], name="determinant")
    path = save(g.model({"x": [1, 3, 3]}, {y: [1]}), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "Operator Det", "node 'determinant'", "tflite-arm", "ort-arm")


def test_op_unknown_to_onnx_runtime(tmp_path):
    graph = helper.make_graph([helper.make_node("Foo", ["x"], ["y"], domain="acme", name="foo1")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)])
    model.ir_version = 8
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "Cannot load 'custom.onnx'", "does not know the op acme::Foo", "node 'foo1'")


def _dynamic_batch_model(tmp_path, shape=("batch", 3, 8, 8)):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    return save(g.model({"x": list(shape)}, {y: list(shape)}), tmp_path)


def test_dynamic_spatial_input_without_shape(tmp_path):
    path = _dynamic_batch_model(tmp_path, ("batch", 3, "h", "w"))
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "dynamic dimensions", "'x' (1x3xhxw) in dims 2 (h), 3 (w)",
                          "--input-shape x=1x3xSIZExSIZE")


def test_dynamic_batch_defaults_to_one_with_a_warning(tmp_path):
    path = _dynamic_batch_model(tmp_path)
    result = _cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "warning: Built for batch size 1" in result.output and "--input-shape x=Nx3x8x8" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["notes"] == [next(p for p in report["passes"] if p["name"] == "default-batch")["details"]["note"]]
    assert report["verification"]["outputs"][0]["shape"] == [1, 3, 8, 8]


def test_dynamic_input_with_shape_builds(tmp_path):
    path = _dynamic_batch_model(tmp_path)
    result = _cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--input-shape", "x=2x3x8x8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "report.json").is_file()


def test_input_shape_contradicting_a_static_dim(tmp_path):
    path = save(_tiny_model(), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--input-shape", "x=1x5"),
                          tmp_path / "out", "static size 4 in dim 1")


def test_malformed_input_shape(tmp_path):
    path = save(_tiny_model(), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--input-shape", "x=1xfour"),
                          tmp_path / "out", "NAME=1x3x224x224")


def test_unknown_target_lists_known_ones(tmp_path):
    path = save(_tiny_model(), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-riscv", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "Unknown target 'tflite-riscv'", "ort-arm, ort-x86, tflite-arm, tflite-x86")


def test_unwritable_output_directory(tmp_path):
    path = save(_tiny_model(), tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = _cli("build", str(path), "-t", "ort-x86", "-o", str(blocker / "out"))
    assert result.exit_code == 2
    assert "Cannot write to output directory" in result.output and "Traceback" not in result.output
    assert not (blocker.parent / "out").exists()


def test_failed_verification_writes_nothing(tmp_path):
    g = GraphBuilder()
    y = g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    path = save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]}), tmp_path)
    result = _cli("build", str(path), "-t", "tflite-x86", "-o", str(tmp_path / "out"), "--tolerance", "0")
    _assert_clean_failure(result, tmp_path / "out", "does not match the source model", "nothing was written", code=3)


def test_failed_build_keeps_previous_artifacts_untouched(tmp_path):
    path = save(_tiny_model(), tmp_path)
    out = tmp_path / "out"
    assert _cli("build", str(path), "-t", "ort-x86", "-o", str(out)).exit_code == 0
    before = {p: (out / p).read_bytes() for p in listing(out)}
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    assert _cli("build", str(bad), "-t", "ort-x86", "-o", str(out)).exit_code == 2
    assert {p: (out / p).read_bytes() for p in listing(out)} == before


def test_inputs_file_with_wrong_names(tmp_path):
    path = save(_tiny_model(), tmp_path)
    np.savez(tmp_path / "data.npz", image=np.zeros((3, 4), np.float32))
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--inputs", str(tmp_path / "data.npz")),
                          tmp_path / "out", "no array for input(s) ['x']", "image")


def test_external_data_outside_model_folder_is_refused(tmp_path):
    model = _tiny_model()
    weight = onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    model.graph.initializer.append(weight)
    path = tmp_path / "hostile.onnx"
    path.write_bytes(model.SerializeToString())
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")),
                          tmp_path / "out", "outside the model's folder")


@pytest.mark.parametrize("argv", [["inspect", "missing.onnx"], ["verify", "missing.onnx", "missing.tflite"]])
def test_other_commands_report_errors_the_same_way(tmp_path, argv):
    result = _cli(*[str(tmp_path / a) if a.endswith((".onnx", ".tflite")) else a for a in argv])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_real_process_exit_code_and_stderr(tmp_path):
    """The installed console script behaves the same: message on stderr, exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "edgec", "build", str(tmp_path / "nope.onnx"), "-t", "ort-x86", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "No such file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("target", "precision", "fragment"), [
    ("ort-x86", "fp16", "Backend 'ort' (target 'ort-x86') cannot build fp16 yet"),
    ("tflite-arm", "int4", "cannot build int4"),
])
def test_precision_the_backend_cannot_build(tmp_path, target, precision, fragment):
    path = save(_tiny_model(), tmp_path)
    result = _cli("build", str(path), "-t", target, "-o", str(tmp_path / "out"), "--precision", precision)
    _assert_clean_failure(result, tmp_path / "out", fragment, "it builds")


def test_int8_without_calibration_data_warns(tmp_path):
    path = save(_tiny_model(), tmp_path)
    result = _cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "out"), "--precision", "int8", "--json")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: Calibrating with random inputs" in text
    # Nothing on an x86 host runs arm code: no timing stage, a warning saying so instead.
    if not same_arch(platform.machine(), "arm64"):
        assert "Timing" not in text and f"not checked against fp32 (this host is {platform.machine()}, the target arm64)" in text


@pytest.mark.skipif(same_arch(platform.machine(), "arm64"), reason="the local device is the target's architecture")
def test_profiling_on_a_device_of_another_architecture_warns(tmp_path):
    path = save(_tiny_model(), tmp_path)
    built = _cli("build", str(path), "-t", "ort-arm", "-o", str(tmp_path / "out"), "--profile", "local")
    assert built.exit_code == 0, built.output
    expected = f"built for ort-arm (arm64), on device 'local' ({platform.machine()}): the numbers describe {platform.machine()}"
    assert expected in " ".join(built.output.split())
    profiled = _cli("profile", str(tmp_path / "out" / "model.onnx"), "-o", str(tmp_path / "prof"), "--runs", "3", "--no-ops")
    assert profiled.exit_code == 0, profiled.output
    assert f"Profiling model.onnx, {expected}" in " ".join(profiled.output.split())


def _conv_with_group_zero(tmp_path):
    """A seeded mutation the ONNX checker and shape inference both pass."""
    g = GraphBuilder()
    y = g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1], name="conv0")
    model = g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]})
    model.graph.node[0].attribute.append(helper.make_attribute("group", 0))
    onnx.checker.check_model(model)
    return save(model, tmp_path)


def test_invalid_model_onnx_runtime_refuses_names_node_and_reason(tmp_path, capfd):
    """The message names the node, before any lowering; ORT's own log line (written by C++
    to file descriptor 2) stays out of stderr."""
    result = _cli("build", str(_conv_with_group_zero(tmp_path)), "-t", "tflite-x86", "-o", str(tmp_path / "out"))
    _assert_clean_failure(result, tmp_path / "out", "ONNX Runtime cannot run node 'conv0' (Conv) of 'model.onnx'", "group: 0")
    assert "Lowering" not in result.output
    assert "onnxruntime:" not in capfd.readouterr().err


def test_gemm_bias_that_does_not_broadcast(tmp_path):
    g = GraphBuilder()
    y = g.op("Gemm", ["x", g.weight(8, 4), g.weight(3)], name="fc")
    path = save(g.model({"x": [1, 8]}, {y: None}), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")), tmp_path / "out",
                          "ONNX Runtime cannot run node 'fc' (Gemm) of 'model.onnx'", "Invalid bias shape")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 traps on an integer division by 0; arm64 gives 0")
def test_onnx_runtime_crashing_on_the_data_is_an_error_not_a_dead_process(tmp_path):
    """Random integer inputs are 0 or 1, and ONNX Runtime's integer Div by 0 traps (SIGFPE),
    which used to end edgec build and edgec verify with no message; the same model with
    inputs it accepts builds and verifies."""
    path = save(binary_op("Div", TensorProto.INT32), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")), tmp_path / "out",
                          "ONNX Runtime crashed (SIGFPE) running 'model.onnx' on the first batch of random (seed 0", "--inputs")
    np.savez(tmp_path / "inputs.npz", x=np.array(DIVIDENDS, np.int32), d=np.array(DIVISORS, np.int32))
    result = _cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "built"), "--inputs", str(tmp_path / "inputs.npz"))
    assert result.exit_code == 0, result.output
    _assert_clean_failure(_cli("verify", str(path), str(tmp_path / "built" / "model.onnx")), tmp_path / "out",
                          "ONNX Runtime crashed (SIGFPE) running 'model.onnx' on the first batch of random (seed 0")
    verified = _cli("verify", str(path), str(tmp_path / "built" / "model.onnx"), "--inputs", str(tmp_path / "inputs.npz"))
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--precision", "int8", "--calib-samples", "0"], "calib_samples (--calib-samples) must be at least 1, not 0"),
    (["--tolerance", "-1"], "tolerance (--tolerance) must be at least 0, not -1.0"),
    (["--min-cosine", "1.5"], "min_cosine (--min-cosine) must be in [0, 1], not 1.5"),
    (["--max-drop", "1"], "max_drop (--max-drop) must be in [0, 1), not 1.0"),
    (["--max-samples", "0"], "max_samples (--max-samples) must be at least 1"),
    (["--seed", "-1"], "seed (--seed) must be at least 0"),
    (["--calib-method", "kmeans"], "calib_method (--calib-method) must be one of entropy, minmax, mse, percentile"),
    (["--image-range", "5,1"], "LO,HI needs LO < HI, not 5,1"),
    (["--image-std", "0.2,0,0.2"], "std (--image-std) must be greater than 0, not 0.0"),
])
def test_option_values_out_of_range_fail_where_given(tmp_path, args, fragment):
    path = save(_tiny_model(), tmp_path)
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "out"), *args), tmp_path / "out",
                          fragment)


@pytest.mark.parametrize(("argv", "fragment"), [
    (["profile", "{model}", "-o", "{out}", "--runs", "0"], "runs (--runs) must be at least 1"),
    (["profile", "{model}", "-o", "{out}", "--threads", "0"], "threads (--threads) must be at least 1"),
    (["profile", "{model}", "-o", "{out}", "--budget-s", "0"], "budget_s (--budget-s) must be greater than 0"),
    (["profile", "{model}", "-o", "{out}", "--warmup", "-1"], "warmup (--warmup) must be at least 0"),
    (["verify", "{model}", "{model}", "--tolerance", "-0.5"], "tolerance (--tolerance) must be at least 0"),
    (["analyze", "{model}", "-o", "{out}", "--sensitivity", "--inputs", "x.npz", "--rates", "0.1,1.5"], "--rates must be in [0, 1), not 1.5"),
    (["analyze", "{model}", "-o", "{out}", "--sensitivity", "--inputs", "x.npz", "--importance", "l3"], "--importance must be one of activation, l1, l2"),
])
def test_other_commands_check_option_values(tmp_path, argv, fragment):
    model = str(save(_tiny_model(), tmp_path))
    _assert_clean_failure(_cli(*[a.format(model=model, out=tmp_path / "out") for a in argv]), tmp_path / "out", fragment)


def test_build_options_check_values_from_python_too():
    from edgec.build import BuildOptions
    from edgec.errors import OptionError

    with pytest.raises(OptionError, match=r"calib_samples \(--calib-samples\) must be at least 1"):
        BuildOptions(calib_samples=0)


def _dynamically_quantized(tmp_path):
    """ONNX Runtime's dynamic quantization of a conv + gemm net: DynamicQuantizeLinear, ConvInteger, MatMulInteger."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    g = GraphBuilder()
    y = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 3, 3, 3), g.weight(8)], pads=[1, 1, 1, 1], name="conv")])
    y = g.op("Gemm", [g.op("Flatten", [y]), g.weight(8 * 8 * 8, 10), g.weight(10)], name="fc")
    path = tmp_path / "dq.onnx"
    quantize_dynamic(save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 10]}), tmp_path), path,
                     op_types_to_quantize=["Conv", "Gemm", "MatMul"], weight_type=QuantType.QUInt8)
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in onnx.load(path).graph.node}
    return path


def test_dynamically_quantized_model_builds_for_ort_and_is_refused_for_tflite(tmp_path):
    path = _dynamically_quantized(tmp_path)
    built = _cli("build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "ort"))
    assert built.exit_code == 0, built.output
    assert (tmp_path / "ort" / "report.json").is_file()
    _assert_clean_failure(_cli("build", str(path), "-t", "tflite-arm", "-o", str(tmp_path / "tfl")), tmp_path / "tfl",
                          "Operator DynamicQuantizeLinear", "already quantized (ConvInteger, DynamicQuantizeLinear, MatMulInteger",
                          "float model it was quantized from", "--target ort-arm or ort-x86")


def test_options_a_build_does_not_use_are_named(tmp_path):
    result = _cli("build", str(save(_tiny_model(), tmp_path)), "-t", "ort-x86", "-o", str(tmp_path / "out"),
                  "--max-drop", "0.01", "--no-speed-check")
    assert result.exit_code == 0, result.output
    expected = "warning: max_drop (--max-drop), speed_check (--no-speed-check) do nothing in a fp32 build; ignored"
    assert expected in " ".join(result.output.split())


def test_ort_only_int8_options_are_named_for_tflite():
    from edgec.build import BuildOptions, _warn_ignored
    from edgec.errors import EdgecWarning
    from edgec.targets import load_target

    with pytest.warns(EdgecWarning, match=r"keep_float \(--keep-float\) does nothing in the tflite backend"):
        _warn_ignored(BuildOptions(keep_float=("conv",)), load_target("tflite-x86"), "int8")
