"""The zoo, end to end: every model builds for every target in fp32 and matches its source
within 1e-4 × max|output|; trained classifiers' fp32 artifacts reproduce the held-out
accuracy recorded in models/zoo.json."""

from __future__ import annotations

import hashlib
import json

import onnx
import pytest
from conftest import REPO

from edgec.build import BuildOptions, build
from edgec.stages.source import source_runner
from edgec.stages.verify import verify_runners
from edgec.runtime import open_runner
from edgec.verify import Criterion
from edgec.errors import EdgecWarning
from edgec.images import ImagePreprocess
from edgec.lower.tflite.convert import op_histogram
from edgec.targets import known_targets, load_target

EVERY_MODEL = json.loads((REPO / "models" / "zoo.json").read_text())
# Large models (a 3-GMAC detector) have their own tests (test_large_models.py): building them
# for every target and precision here would add many minutes to CI.
ZOO = [e for e in EVERY_MODEL if not e.get("large")]
BY_NAME = {e["name"]: e for e in ZOO}
TARGETS = known_targets()


def _path(entry):
    return REPO / "models" / entry["file"]


def _options(entry, **more):
    """Build options feeding the entry's own held-out data (photos scaled as the model expects)."""
    images = ImagePreprocess(tuple(entry.get("input_range", (0.0, 1.0))))
    return BuildOptions(inputs=str(REPO / entry["eval_data"]) if entry["eval_data"] else None, images=images, **more)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_zoo_model_builds_and_verifies(name, target, tmp_path):
    entry = BY_NAME[name]
    tolerance = _tolerance(entry, target)
    result = build(_path(entry), target, tmp_path / "out", _options(entry, tolerance=tolerance))
    verification = result.verification
    assert verification.passed
    for output in verification.outputs:
        assert output.max_abs_error <= tolerance * output.max_abs_reference, output
    if entry["task"] == "classification":
        recorded = entry["metrics"]["top1"]
        logits = verification.outputs[0]
        assert logits.accuracy_source == pytest.approx(recorded, abs=1e-6)
        assert logits.accuracy_artifact == pytest.approx(recorded, abs=1e-6)
    if load_target(target).backend == "tflite":
        _assert_layout_is_native(entry, result)


def _tolerance(entry, target):
    """1e-4, or for a production model on TFLite the disagreement of Google's own .tflite with
    ONNX Runtime on the same photos, if larger: that much is XNNPACK's float arithmetic
    (selfie_segmentation's mask reaches 1.9e-4 there, bit for bit what edgec's file gives)."""
    if "original_tflite" not in entry or load_target(target).backend != "tflite":
        return 1e-4
    original = open_runner(REPO / "models" / entry["original_tflite"], threads=1)
    options = _options(entry)
    baseline = verify_runners(source_runner(_path(entry)), original, options, Criterion(tolerance=1.0))
    return max(1e-4, 1.01 * max(o.relative_error for o in baseline.outputs))


def _assert_layout_is_native(entry, result):
    """Conv nets lower without a single Transpose; TFLite round trips add no layout ops."""
    ops = result.report["lowering"]["tflite_ops"]
    if entry["name"] != "transformer":  # its attention heads transpose in any layout
        assert "TRANSPOSE" not in ops, ops
    if "original_tflite" in entry:
        _assert_no_worse_than_original(entry, next(p for p in result.artifacts if p.suffix == ".tflite"))


# Ops that only exist because of a layout change or a converter's bookkeeping.
LAYOUT_OPS = ("TRANSPOSE", "RESHAPE", "PAD")


def _assert_no_worse_than_original(entry, artifact):
    """A TFLite model that went TFLite -> ONNX -> edgec -> TFLite comes back without the
    Transposes tf2onnx put around every conv: no more layout ops than the original and
    the same number of compute ops."""
    original = op_histogram((REPO / "models" / entry["original_tflite"]).read_bytes())
    lowered = op_histogram(artifact.read_bytes())
    for op in LAYOUT_OPS:
        assert lowered.get(op, 0) <= original.get(op, 0), (op, lowered, original)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        assert lowered.get(op, 0) == original.get(op, 0), (op, lowered, original)


def test_zoo_files_match_their_records():
    for entry in EVERY_MODEL:
        content = _path(entry).read_bytes()
        assert hashlib.sha256(content).hexdigest() == entry["sha256"], entry["name"]
        assert len(content) < (8 if entry.get("large") else 5) * 2**20


def test_classifiers_are_trained_on_real_data():
    classifiers = [e for e in ZOO if e["task"] == "classification"]
    assert len(classifiers) >= 6
    for entry in classifiers:
        assert entry["metrics"]["n"] == 600 and entry["metrics"]["top1"] >= 0.95, entry["name"]
        assert (REPO / entry["eval_data"]).is_file() and (REPO / entry["calib_data"]).is_file()


# Patterns each architecture is in the zoo for (op types that must appear in its ONNX).
EXPECTED_OPS = {
    "mobilenetv2": {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Gemm"},
    "resnet": {"Conv", "BatchNormalization", "Add", "Relu", "MaxPool", "Gemm"},
    "mobilenetv3": {"HardSwish", "HardSigmoid", "Sigmoid", "Mul", "GlobalAveragePool"},
    "unet": {"ConvTranspose", "Resize", "Concat", "MaxPool"},
    "vgg": {"Flatten", "Gemm", "MaxPool", "BatchNormalization"},
    "mlp": {"Gemm", "Relu"},
    "transformer": {"MatMul", "LayerNormalization", "Softmax", "Erf", "Transpose", "Reshape"},
    "keras_cnn": {"Transpose", "Pad", "PRelu", "Clip", "Conv"},
    "blazeface": {"Transpose", "Pad", "Conv", "Concat"},
    "face_landmark": {"PRelu", "Pad", "Conv"},
    "selfie_segmentation": {"Transpose", "HardSwish", "Resize", "ConvTranspose"},
    "palm_detection": {"PRelu", "Resize", "Concat"},
    "detector": {"Conv", "BatchNormalization", "Sigmoid", "Mul", "Add", "Resize", "Concat"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_zoo_model_has_its_patterns(name):
    entry = next(e for e in EVERY_MODEL if e["name"] == name)
    ops = {n.op_type for n in onnx.load(_path(entry)).graph.node}
    assert EXPECTED_OPS[name] <= ops, EXPECTED_OPS[name] - ops


def test_keras_model_reaches_onnx_nhwc():
    entry = BY_NAME["keras_cnn"]
    assert entry["inputs"][0]["shape"] == [1, 32, 32, 1] and entry["exporter"] == "tf2onnx-keras"


def test_a_pretrained_production_model_is_included():
    pretrained = [e for e in ZOO if e["exporter"] == "tf2onnx-tflite"]
    assert pretrained
    for entry in pretrained:
        assert (REPO / "models" / entry["original_tflite"]).is_file()


DIGITS = sorted(e["name"] for e in ZOO if e["calib_data"] and "input_range" not in e)
PHOTO_MODELS = sorted(e["name"] for e in ZOO if "input_range" in e)
INT8_KERNEL_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"}


def _int8(entry, out, **more):
    """tflite-arm int8 with bias correction on (deciding it by measurement doubles the build;
    test_quantize covers that)."""
    options = _options(entry, calib=str(REPO / entry["calib_data"]), precision="int8", bias_correction=True, **more)
    result = build(_path(entry), "tflite-arm", out, options)
    assert result.report["calibration"]["real_data"] is True
    lowering = result.report["lowering"]
    # Whatever XNNPACK leaves outside is float (its float limits, as in the fp32 file), never int8.
    assert set(lowering["placement"]["outside_delegate"]) <= set(lowering["float_ops"]), lowering
    return result


@pytest.mark.parametrize("name", DIGITS)
def test_zoo_model_builds_full_integer_tflite(name, tmp_path):
    """int8 with the zoo's calibration split: conv/fc in int8 wherever all-int8 meets the
    accuracy goal, no int8 op left outside XNNPACK (ops it has no int8 kernel for, e.g.
    PRelu, kept float), held-out top-1 within 1 point."""
    entry = BY_NAME[name]
    result = _int8(entry, tmp_path / "out")
    lowering = result.report["lowering"]
    all_int8_met_goal = lowering["search"][0]["passed"]
    if all_int8_met_goal:
        assert lowering["kept_float"] == 0 and not INT8_KERNEL_OPS & set(lowering["float_ops"]), lowering["float_ops"]
    # Conv nets meet the search goal fully in int8; the transformer's int8 attention (cosine
    # 0.993 on held-out digits) does not reach the 0.995 the search asks, so some ops stay float.
    assert all_int8_met_goal or name == "transformer", lowering["search"]
    output = result.verification.outputs[0]
    assert output.cosine >= 0.98
    if entry["task"] == "classification":
        assert output.accuracy_artifact >= output.accuracy_source - 0.01, (output.accuracy_source, output.accuracy_artifact)


@pytest.mark.parametrize("name", PHOTO_MODELS)
def test_production_model_builds_int8_tflite_from_photos(name, tmp_path):
    """The int8 default criterion (every output cosine ≥ 0.98 on held-out photos) holds for
    every production model: the precision search keeps float the ops it takes (selfie's mask
    needs most of them; the others few or none)."""
    result = _int8(BY_NAME[name], tmp_path / "out")
    assert result.verification.passed
    assert min(o.cosine for o in result.verification.outputs) >= 0.98


def test_real_photos_calibrate_better_than_random_data(tmp_path):
    entry = BY_NAME["selfie_segmentation"]
    photos = _int8(entry, tmp_path / "photos", min_cosine=0.0).verification.outputs[0].cosine
    with pytest.warns(EdgecWarning, match="Calibrating with random inputs"):
        random = build(_path(entry), "tflite-arm", tmp_path / "random",
                       _options(entry, precision="int8", min_cosine=0.0, bias_correction=True)).verification.outputs[0].cosine
    assert photos > random + 0.1, (photos, random)


ORT_TARGETS = [t for t in TARGETS if load_target(t).backend == "ort"]
MAC_OPS = ("Conv", "Gemm", "MatMul")


@pytest.mark.parametrize("target", ORT_TARGETS)
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_zoo_model_builds_int8_for_onnx_runtime(name, target, tmp_path):
    """QDQ int8 from the zoo's calibration data: every output keeps cosine ≥ 0.99 on held-out
    data (the target's criterion), classifiers lose at most one point of top-1."""
    entry = BY_NAME[name]
    classifier = entry["task"] == "classification"
    options = _options(entry, calib=str(REPO / entry["calib_data"]), precision="int8", speed_check=False,
                       max_drop=0.01 if classifier else None)
    result = build(_path(entry), target, tmp_path / "out", options)
    quantization = result.report["lowering"]["quantization"]
    assert sum(quantization["quantized_ops"].get(op, 0) for op in MAC_OPS) > 0, quantization["quantized_ops"]
    assert result.verification.passed
    assert min(o.cosine for o in result.verification.outputs) >= 0.99
    if classifier:
        output = result.verification.outputs[0]
        assert output.accuracy_artifact >= output.accuracy_source - 0.01, (output.accuracy_source, output.accuracy_artifact)
