"""Latency prediction: kernels of a lowered .tflite, a tiny calibration here, predictions."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgec.build import canonicalize, input_specs
from edgec.cli import app
from edgec.lower import LowerOptions, lower
from edgec.predict import PredictorMissing, PredictorStore, predict, predict_cost
from edgec.predict.calibrate import _lower, calibrate
from edgec.predict.kernels import DETECTOR, FEATURES, Kernel, detect, interface_of, kernels_of
from edgec.predict.model import FIXED, WORK, Predictor, _fixed, _work, regressor_key
from edgec.predict.measure import measure_batch
from edgec.predict.space import Sample
from edgec.predict.tiles import Core, Tiles, core_from_cpuinfo, core_of, gemm_tiles, heuristic_mr, kind_tiling
from edgec.profile import get_device
from edgec.profile.emulator import setup_problem
from edgec.targets import load_target
from edgec.verify import random_inputs


def _small_cnn(residual: bool = True):
    """Conv 3x3 (+Relu) → [doubled by an Add] → global average pool → fully connected."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1, "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "fc")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"])]
    if residual:
        nodes.append(helper.make_node("Add", ["r", "r"], ["s"]))
    nodes += [helper.make_node("GlobalAveragePool", ["s" if residual else "r"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b, fc])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return canonicalize(ir.from_proto(model), {})[0]


def _tflite(tmp_path, precision: str = "fp32", residual: bool = True):
    model = _small_cnn(residual)
    options = LowerOptions("int8", random_inputs(input_specs(model), count=4)) if precision == "int8" else LowerOptions(precision)
    lowered = lower(model, load_target("tflite-x86"), "cnn", options)
    path = tmp_path / f"cnn-{precision}-{residual}.tflite"
    path.write_bytes(lowered.files[lowered.primary])
    return path


def test_kernels_after_fusion(tmp_path):
    kernels = detect(_tflite(tmp_path))
    assert [k.key for k in kernels] == ["CONV_2D/fp32", "ADD/fp32", "MEAN/fp32", "FULLY_CONNECTED/fp32"]
    conv = kernels[0].to_dict()  # the Relu is fused into the convolution
    assert (conv["hin"], conv["cin"], conv["cout"], conv["k"], conv["stride"]) == (16, 8, 8, 3, 1)
    assert conv["macs"] == 16 * 16 * 8 * 8 * 9
    assert kernels[1].to_dict()["in2"] == 16 * 16 * 8  # the residual is an activation, not a constant
    int8 = [k.key for k in detect(_tflite(tmp_path, "int8"))]
    assert int8[0] == int8[-1] == "CONVERT/int8" and "CONV_2D/int8" in int8
    # fp16 weights are widened once when the model loads: no conversion per inference
    assert [k.key for k in detect(_tflite(tmp_path, "fp16"))] == [k.key for k in kernels]


def test_missing_predictor_names_the_calibration(tmp_path):
    with pytest.raises(PredictorMissing, match="edgec device calibrate local"):
        predict(_tflite(tmp_path), get_device("local"), tmp_path / "cache")
    result = CliRunner().invoke(app, ["predict", str(_tflite(tmp_path)), "--device", "local", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "edgec device calibrate local" in result.output


def test_tiny_calibration_fits_resumes_and_predicts(tmp_path, monkeypatch):
    device, cache = get_device("local"), tmp_path / "cache"
    store = PredictorStore(cache, "local")
    options = {"ops": ("Conv",), "precisions": ("fp32",), "batch_size": 4}
    calibrate(device, store, 0.001, 1, **options)
    first = store.samples()
    predictor = calibrate(device, store, 0.001, 1, **options)  # continues: a second batch
    assert {r["batch"] for r in store.samples()} == {0, 1} and store.samples()[:len(first)] == first
    assert "CONV_2D/fp32" in predictor.regressors and predictor.metric == "ms"
    artifact = _tflite(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(artifact), "--device", "local", "--cache-dir", str(cache), "--json"])
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.output)["predictions"]
    assert {"artifact", "device", "metric", "predicted", "kernels"} <= prediction.keys()
    assert prediction["metric"] == "ms" and prediction["predicted"] > prediction["base"] > 0
    assert prediction["unknown"] == ["ADD/fp32", "FULLY_CONNECTED/fp32", "MEAN/fp32"]  # reported, not guessed
    conv = prediction["kernels"][0]
    assert conv["kind"] == "CONV_2D" and conv["predicted"] > 0
    assert predict(artifact, device, cache) == predict(artifact, device, cache)
    assert predict_cost(artifact, "local", cache) == prediction["predicted"]
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(cache))  # `edgec profile` shows the prediction beside the measurement
    result = CliRunner().invoke(app, ["profile", str(artifact), "--runs", "3", "--warmup", "1", "--no-ops", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    (measurement,) = json.loads((tmp_path / "p" / "profile.json").read_text())["measurements"]
    assert measurement["predicted"]["metric"] == "ms" and measurement["predicted"]["value"] == prediction["predicted"]


@pytest.mark.skipif(setup_problem(get_device("emulated-a76").emulation) is not None, reason="no emulator (make arm-emulator)")
def test_emulated_batch_counts_are_deterministic(tmp_path):
    contents = [_tflite(tmp_path, residual=r).read_bytes() for r in (False, True)]
    device = get_device("emulated-a76")
    counts = measure_batch(device, contents, 1)
    assert all(count > 10_000 for count in counts)
    assert measure_batch(device, contents, 1) == counts


def _record(kernels: list[tuple[str, tuple[int, ...]]], cost_of, io=(1, 1, 64, 64)) -> dict:
    entries = [{"kind": kind, "precision": "fp32", "operator": "op", **dict(zip(FEATURES, shape))} for kind, shape in kernels]
    interface = dict(zip(("inputs", "outputs", "in_bytes", "out_bytes"), io))
    fixed = 1000 + 300 * (io[0] + io[1]) + 0.5 * (io[2] + io[3])
    return {"kernels": entries, "io": interface, "cost": fixed + sum(cost_of(kind, shape) for kind, shape in kernels),
            "base": 1000.0, "threads": 1}


def test_joint_fit_separates_kernels_from_the_fixed_part():
    """Costs made of a fixed part (invoke, copies) and per-kind linear terms, some measured only
    in models of several kernels: one fit recovers the parts well enough to predict a model of
    a new size."""
    def cost_of(kind, shape):
        macs, out = shape[-1], shape[3] * shape[4] * shape[5]
        return 200 + (0.25 * macs + 0.1 * out if kind == "CONV_2D" else 2.0 * out)

    rng = np.random.default_rng(0)

    def conv(c):
        return "CONV_2D", (16, 16, c, 16, 16, c, 3, 1, 0, 16 * 16 * c * c * 9)

    def add(c):
        return "ADD", (16, 16, c, 16, 16, c, 0, 1, 16 * 16 * c, 16 * 16 * c)

    records = [_record([conv(int(c))], cost_of, (1, 1, int(c) * 1024, int(c) * 1024)) for c in rng.integers(4, 64, 20)]
    records += [_record([conv(int(c)), add(int(c))], cost_of, (2, 1, int(c) * 2048, int(c) * 1024)) for c in rng.integers(4, 64, 20)]
    predictor = Predictor.fit(records, get_device("emulated-a76"), 1, "tflite-arm")
    model = _record([conv(96), add(96), conv(96)], cost_of, (1, 1, 96 * 1024, 96 * 1024))
    kernels = [Kernel(e["kind"], e["precision"], tuple(e[f] for f in FEATURES), e["operator"]) for e in model["kernels"]]
    predicted = predictor.fixed_cost(model["io"]) + sum(predictor.kernel_costs(kernels))
    assert predicted == pytest.approx(model["cost"], rel=0.02)
    assert Predictor.fit(records, get_device("emulated-a76"), 1, "tflite-arm").kernel_costs(kernels) == predictor.kernel_costs(kernels)


@pytest.mark.skipif(setup_problem(get_device("emulated-a76").emulation) is not None, reason="no emulator (make arm-emulator)")
def test_calibration_on_ray_measures_one_batch_per_worker_and_the_same_counts(tmp_path, ray_cluster):
    from edgec.executors import make_executor

    device, options = get_device("emulated-a76"), {"ops": ("Conv",), "precisions": ("fp32",), "batch_size": 3}
    here = PredictorStore(tmp_path / "here", device.name)
    calibrate(device, here, 0, 1, **options)  # one batch
    executor = make_executor("ray", ray_cluster)
    try:
        on_ray = PredictorStore(tmp_path / "ray", device.name)
        calibrate(device, on_ray, 0, 1, executor=executor, **options)  # one round: a batch per worker
    finally:
        executor.close()
    assert {r["batch"] for r in on_ray.samples()} == {0, 1}
    assert [r for r in on_ray.samples() if r["batch"] == 0] == here.samples()


def test_xnnpack_tiles_pad_pixels_channels_and_dot_product_depth():
    """A layer costs whole micro-kernel tiles: pixels padded to XNNPACK's choice of mr, output
    channels to nr, and (int8 with dot product) each tap's input channels to 4."""
    f32, dot = gemm_tiles("fp32", Core(dot_product=True)), gemm_tiles("int8", Core(dot_product=True))
    assert heuristic_mr(np.array([1, 4, 5, 4096]), f32).tolist() == [1, 4, 6, 6]
    assert heuristic_mr(np.array([1, 3, 4096]), dot).tolist() == [1, 4, 4]
    conv = kind_tiling("CONV_2D", "fp32", Core(dot_product=True))
    work = dict(zip(WORK, _work(_conv_shape(64, 24, 32, 3), conv)[0]))
    assert work["tiles"] == 683 * 4 and work["macs_tiled"] == 683 * 6 * 4 * 8 * 24 * 9 and work["macs_narrow"] == 0
    rgb = _conv_shape(32, 3, 16, 3)
    assert dict(zip(WORK, _work(rgb, kind_tiling("CONV_2D", "int8", Core(dot_product=True)))[0]))["macs_tiled"] == 32 * 32 * 16 * 9 * 4
    assert dict(zip(WORK, _work(rgb, kind_tiling("CONV_2D", "int8", Core()))[0]))["macs_tiled"] == 32 * 32 * 16 * 9 * 3


def _conv_shape(size: int, cin: int, cout: int, k: int, stride: int = 1) -> np.ndarray:
    out = size // stride
    return np.array([[size, size, cin, out, out, cout, k, stride, 0, out * out * cout * k * k * cin]], dtype=np.float64)


def test_fp32_layers_that_fill_tiles_of_8_poorly_take_the_narrow_micro_kernel():
    """XNNPACK runs a 1x1 convolution as a fully connected layer, and gives an fp32 one the 4x2
    micro-kernel when its output channels waste part of the 6x8 one's tiles; other convolutions
    only below 8 channels; int8 never."""
    def narrow(kind, precision, shape):
        return dict(zip(WORK, _work(shape, kind_tiling(kind, precision, Core(dot_product=True)))[0]))["macs_narrow"] > 0
    assert narrow("CONV_2D", "fp32", _conv_shape(64, 24, 28, 1))
    assert not narrow("CONV_2D", "fp32", _conv_shape(64, 24, 32, 1))
    assert not narrow("CONV_2D", "fp32", _conv_shape(64, 24, 28, 3)) and narrow("CONV_2D", "fp32", _conv_shape(64, 24, 6, 3))
    assert not narrow("CONV_2D", "fp32", _conv_shape(64, 24, 28, 1, stride=2))
    assert not narrow("CONV_2D", "int8", _conv_shape(64, 24, 28, 1))
    fc = np.array([[1, 1, 158, 1, 1, 268, 0, 1, 0, 158 * 268]], dtype=np.float64)
    assert narrow("FULLY_CONNECTED", "fp32", fc)
    assert not narrow("FULLY_CONNECTED", "fp32", np.array([[1, 1, 158, 1, 1, 1004, 0, 1, 0, 158 * 1004]], dtype=np.float64))


def test_fit_on_tiled_work_predicts_channels_it_never_saw():
    """Convolutions whose cost is their tiles' work: fitted on other widths, the predictor
    prices a 3x3 convolution to 28 channels (a partly filled tile of 8) as it costs."""
    tiling = kind_tiling("CONV_2D", "fp32", Core())

    def conv(c, cout):
        return "CONV_2D", tuple(_conv_shape(32, c, cout, 3)[0])

    def cost_of(kind, shape):
        work = dict(zip(WORK, _work(np.array([shape], dtype=np.float64), tiling)[0]))
        return 0.6 * work["macs_tiled"] + 40 * work["tap_tiles"]

    records = [_record([conv(c, cout)], cost_of) for c in (8, 13, 24, 37, 48) for cout in (9, 16, 21, 40, 64)]
    predictor = Predictor.fit(records, get_device("emulated-a53"), 1, "tflite-arm")
    odd = _record([conv(24, 28)], cost_of)
    kernels = [Kernel("CONV_2D", "fp32", conv(24, 28)[1], "op")]
    assert predictor.fixed_cost(odd["io"]) + sum(predictor.kernel_costs(kernels)) == pytest.approx(odd["cost"], rel=0.01)


def test_x86_cores_get_xnnpack_x86_tiles_by_their_cpu_flags():
    """On an AVX-512 host with AMX (the dev box: its fp32 1x1 convolutions cost the same from 33
    to 64 channels, 24 channels more than 32; int8 steps at 64 channels and 16 pixels), fp32
    runs 7x32 tiles and 7x16 below 32 channels, int8 AMX's 16x64c4; without AMX, 7x16c8."""
    flags = "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni amx_tile amx_int8\nflags\t\t: fpu\n"
    core = core_from_cpuinfo("processor\t: 0\n" + flags)
    assert core == Core(x86=frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "amx_int8"}))
    assert gemm_tiles("fp32", core) == Tiles((1, 7), 32) and gemm_tiles("int8", core) == Tiles((1, 16), 64, 4)
    assert gemm_tiles("int8", Core(x86=frozenset({"avx512_vnni", "avx512f"}))) == Tiles((1, 7), 16, 8)
    conv = kind_tiling("CONV_2D", "fp32", core)
    assert conv.narrow_layers(np.array([16, 24, 32, 40]), np.array([3] * 4), np.ones(4)).tolist() == [True, True, False, False]
    assert conv.narrow_layers(np.array([40, 56]), np.ones(2), np.ones(2)).tolist() == [True, False]
    assert kind_tiling("DEPTHWISE_CONV_2D", "int8", core, 9).wide == Tiles((1,), 16)
    assert core_from_cpuinfo("CPU implementer\t: 0x41\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n") == Core(dot_product=True)


def test_weights_past_the_cache_are_streamed_every_inference():
    """A model whose weights outgrow its core's cache reads the rest again each inference; a
    device that counts instructions has no such cache (infinite)."""
    content = _lower(Sample("Conv", "fp32", {"h": 8, "c": 8, "cout": 16, "k": 3, "stride": 1}), "tflite-x86")
    assert interface_of(content).weight_bytes == (16 * 8 * 9 + 16) * 4
    interface = {"inputs": 1, "outputs": 1, "in_bytes": 0, "out_bytes": 0, "weight_bytes": 3 * 2 ** 20}
    streamed = FIXED.index("weights_streamed")
    assert _fixed(interface, 2 ** 21)[streamed] == 2 ** 20 and _fixed(interface)[streamed] == 0
    assert _fixed({**interface, "weight_bytes": 2 ** 20}, 2 ** 21)[streamed] == 0


@pytest.mark.skipif(setup_problem(get_device("emulated-a76").emulation) is not None, reason="no emulator (make arm-emulator)")
def test_emulated_cores_are_read_as_linux_reports_them():
    assert core_of(get_device("emulated-a76")) == Core(dot_product=True, little=False)
    assert core_of(get_device("emulated-a53")) == Core(dot_product=False, little=True)


def test_unary_runs_between_int8_values_are_one_table_lookup():
    """XNNPACK fuses unary ops from an 8-bit value to an 8-bit value into one table lookup: a
    hard-swish XNNPACK keeps float between two conversions, or a chain of int8 sigmoids. A
    PReLU (a per-channel slope: binary) keeps its conversions."""
    def keys(op, sizes):
        return [k.key for k in kernels_of(_lower(Sample(op, "int8", sizes), "tflite-arm"))]
    assert keys("MixedChain", {"h": 8, "c": 8, "k": 1, "act": 1}) == ["CONV_2D/int8", "LUT/int8", "CONV_2D/int8"]
    assert keys("MixedChain", {"h": 8, "c": 8, "k": 1, "act": 0}) == [
        "CONV_2D/int8", "CONVERT/int8", "PRELU/fp32", "CONVERT/int8", "CONV_2D/int8"]
    assert keys("SigmoidChain", {"h": 8, "c": 8, "n": 3}) == ["LUT/int8"]


def test_depthwise_work_counts_whole_tiles_remainder_steps_and_fixed_taps():
    """int8 depthwise: 16 channels a tile, the rest 8 at a time, taps in kernels of 3, 9 or 25."""
    tiling = kind_tiling("DEPTHWISE_CONV_2D", "int8", Core(dot_product=True))

    def work(c, k):
        shape = np.array([[8, 8, c, 8, 8, c, k, 1, 0, 64 * c * k * k]], dtype=np.float64)
        return dict(zip(WORK, _work(shape, tiling)[0]))
    assert (work(16, 3)["tiles"], work(16, 3)["steps"]) == (64, 0)
    assert (work(9, 3)["tiles"], work(9, 3)["steps"]) == (0, 128)
    assert (work(24, 5)["tiles"], work(24, 5)["tap_steps"]) == (64, 64 * 25)
    assert work(16, 1)["tap_tiles"] == 64 * 3  # a 1x1 int8 depthwise convolution runs the 3-tap kernel


def test_refit_reads_kernels_of_samples_an_older_detector_read_anew(tmp_path):
    """A sample stored before int8 unary runs were one table lookup is lowered again and read
    anew by a refit (no new measurement), and the samples file keeps what it read."""
    store = PredictorStore(tmp_path, "local")
    old = [{"kind": kind, "precision": precision, "operator": "op", **dict(zip(FEATURES, (8, 8, 8, 8, 8, 8, 0, 1, 0, 512)))}
           for kind, precision in (("CONVERT", "int8"), ("HARD_SWISH", "fp32"), ("CONVERT", "int8"))]
    store.append([{"batch": 0, "sample": Sample("HardSwish", "int8", {"h": h, "c": 8}).to_dict(), "kernels": old,
                   "io": {"inputs": 1, "outputs": 1, "in_bytes": h * h * 8, "out_bytes": h * h * 8},
                   "cost": 1000.0 + h * h, "base": 100.0, "threads": 1} for h in (4, 8, 16)])
    predictor = calibrate(get_device("local"), store, 0, 1)
    assert {r["detector"] for r in store.samples()} == {DETECTOR}
    assert [[k["kind"] for k in r["kernels"]] for r in store.samples()] == [["LUT"]] * 3
    assert list(predictor.regressors) == ["LUT/int8"]


def test_depthwise_micro_kernels_are_priced_apart():
    """Each depthwise tap count is its own micro-kernel (its own regressor); the little cores'
    fp32 3x3 one computes 4 channels a tile."""
    assert regressor_key("DEPTHWISE_CONV_2D", "fp32", 3) == "DEPTHWISE_CONV_2D/fp32/9"
    assert regressor_key("DEPTHWISE_CONV_2D", "int8", 1) == "DEPTHWISE_CONV_2D/int8/3"
    assert regressor_key("CONV_2D", "fp32", 3) == "CONV_2D/fp32"
    assert kind_tiling("DEPTHWISE_CONV_2D", "fp32", Core(little=True), 9).wide.nr == 4
    assert kind_tiling("DEPTHWISE_CONV_2D", "fp32", Core(little=True), 25).wide.nr == 8
