"""TFLite lowering end to end on graphs built for one pattern or rule each: the artifact must
reproduce ONNX Runtime's output on the source within 1e-4 × max|output| (the build verifies
and fails otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DIVIDENDS, DIVISORS, QUOTIENTS, GraphBuilder, binary_op, save
from onnx import TensorProto, helper, numpy_helper

from edgec.build import BuildOptions, build
from edgec.errors import EdgecWarning
from edgec.lower.tflite import to_keras
from edgec.lower.tflite.registry import supported_ops
from edgec.runtime import open_runner


def lower(proto, tmp_path, target="tflite-x86"):
    result = build(save(proto, tmp_path), target, tmp_path / "out", BuildOptions(seed=3))
    assert result.verification.passed
    assert all(o.relative_error <= 1e-4 for o in result.verification.outputs)
    return result.report


def conv(g, x, cin, cout, k=3, **attrs):
    attrs.setdefault("pads", [k // 2] * 4)
    return g.op("Conv", [x, g.weight(cout, cin // attrs.get("group", 1), k, k), g.weight(cout)], **attrs)


def image_model(g, y, shape, cin=3, size=8):
    return g.model({"x": [1, cin, size, size]}, {y: shape})


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def channel_shuffle(g):
    c = conv(g, "x", 3, 8)
    grouped = g.op("Reshape", [c, g.const(np.array([1, 2, 4, 8, 8], np.int64))])
    shuffled = g.op("Transpose", [grouped], perm=[0, 2, 1, 3, 4])
    y = conv(g, g.op("Reshape", [shuffled, g.const(np.array([1, 8, 8, 8], np.int64))]), 8, 4)
    return image_model(g, y, [1, 4, 8, 8])


@case
def split_on_channels(g):
    a, b = g.op("Split", [conv(g, "x", 3, 8), g.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    return image_model(g, g.op("Concat", [conv(g, b, 5, 2), g.op("Relu", [a])], axis=1), [1, 5, 8, 8])


@case
def slice_on_channels(g):
    c = conv(g, "x", 3, 8)
    s = g.op("Slice", [c, g.const(np.array([1], np.int64)), g.const(np.array([7], np.int64)), g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))])
    return image_model(g, conv(g, s, 3, 4), [1, 4, 8, 8])


@case
def layernorm_tokens(g):
    h = g.op("MatMul", ["x", g.weight(16, 32)])
    y = g.op("LayerNormalization", [h, g.const(np.linspace(0.5, 1.5, 32).astype(np.float32)), g.weight(32)], axis=-1, epsilon=1e-5)
    return g.model({"x": [1, 8, 16]}, {y: [1, 8, 32]})


def exported_gelu(g, h):
    """GELU as the TorchScript exporter writes it: h · (1 + erf(h / √2)) · ½."""
    erf = g.op("Erf", [g.op("Div", [h, g.const(np.array(1.4142135, np.float32))])])
    return g.op("Mul", [g.op("Mul", [h, g.op("Add", [erf, g.const(np.array(1.0, np.float32))])]), g.const(np.array(0.5, np.float32))])


@case
def erf_gelu(g):
    y = exported_gelu(g, g.op("MatMul", ["x", g.weight(16, 16, scale=1.0)]))
    return g.model({"x": [1, 8, 16]}, {y: [1, 8, 16]})


@case
def standalone_erf(g):
    return g.model({"x": [1, 64]}, {g.op("Erf", [g.op("Mul", ["x", g.const(np.array(2.0, np.float32))])]): [1, 64]})


@case
def resize_to_other_tensors_size(g):
    skip = conv(g, "x", 3, 4)
    small = conv(g, g.op("MaxPool", [skip], kernel_shape=[2, 2], strides=[2, 2]), 4, 4)
    size = g.op("Shape", [skip])
    up = g.op("Resize", [small, "", "", size], mode="linear", coordinate_transformation_mode="half_pixel")
    return image_model(g, g.op("Add", [up, skip]), [1, 4, 8, 8])


@case
def multiple_outputs(g):
    c = conv(g, "x", 3, 4)
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [c])])
    return g.model({"x": [1, 3, 8, 8]}, {c: [1, 4, 8, 8], g.op("Gemm", [pooled, g.weight(3, 4), g.weight(3)], transB=1): [1, 3]})


@case
def conv1d(g):
    c = g.op("Conv", ["x", g.weight(6, 4, 3), g.weight(6)], pads=[1, 1])
    y = g.op("Conv", [g.op("Relu", [c]), g.weight(6, 1, 5)], group=6, pads=[2, 2], strides=[2])
    return g.model({"x": [1, 4, 16]}, {y: [1, 6, 8]})


@case
def grouped_conv(g):
    return image_model(g, conv(g, conv(g, "x", 3, 8), 8, 8, group=4), [1, 8, 8, 8])


@case
def depthwise_multiplier_and_dilation(g):
    d = conv(g, conv(g, "x", 3, 4), 4, 8, group=4)
    return image_model(g, g.op("Conv", [d, g.weight(4, 8, 3, 3)], pads=[2, 2, 2, 2], dilations=[2, 2]), [1, 4, 8, 8])


@case
def strided_and_dilated(g):
    """SKNet's 3×3 branch (stride 2, dilation 2: runs on every other input position) and a
    depthwise 3×2 conv whose stride does not divide its dilation (stride 1 conv, sampled)."""
    sk = conv(g, conv(g, "x", 3, 4), 4, 8, pads=[2, 2, 2, 2], strides=[2, 2], dilations=[2, 2])
    dw = g.op("Conv", [sk, g.weight(8, 1, 3, 2)], group=8, pads=[3, 1, 2, 0], strides=[2, 3], dilations=[3, 2])
    return image_model(g, dw, [1, 8, 2, 1])


@case
def softmax_non_last_axis(g):
    return image_model(g, g.op("Softmax", [conv(g, "x", 3, 5)], axis=1), [1, 5, 8, 8])


@case
def flatten_gemm_after_conv(g):
    flat = g.op("Flatten", [g.op("MaxPool", [conv(g, "x", 3, 4), ], kernel_shape=[2, 2], strides=[2, 2])])
    return image_model(g, g.op("Gemm", [flat, g.weight(64, 10), g.weight(10)]), [1, 10])


@case
def strided_symmetric_pads(g):
    """PyTorch-style symmetric pads on a stride-2 conv differ from TF's 'same'."""
    return image_model(g, conv(g, "x", 3, 4, strides=[2, 2]), [1, 4, 4, 4])


@case
def conv_transpose_pads_and_output_padding(g):
    c = g.op("ConvTranspose", [conv(g, "x", 3, 4), g.weight(4, 6, 3, 3), g.weight(6)], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    return image_model(g, c, [1, 6, 16, 16])


@case
def pools_with_padding(g):
    c = conv(g, "x", 3, 4)
    a = g.op("AveragePool", [c], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)
    b = g.op("AveragePool", [c], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    m = g.op("MaxPool", [c], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    e = g.op("AveragePool", [c], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0], count_include_pad=0)
    return g.model({"x": [1, 3, 8, 8]}, {a: [1, 4, 8, 8], b: [1, 4, 4, 4], m: [1, 4, 4, 4], e: [1, 4, 4, 4]})


@case
def max_pool_ceil_mode(g):
    return g.model({"x": [1, 3, 9, 9]}, {g.op("MaxPool", [conv(g, "x", 3, 4)], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1): [1, 4, 5, 5]})


@case
def activations(g):
    c = conv(g, "x", 3, 6)
    chain = g.op("LeakyRelu", [c], alpha=0.1)
    chain = g.op("PRelu", [chain, g.const(np.linspace(0.1, 0.6, 6).astype(np.float32).reshape(6, 1, 1))])
    chain = g.op("HardSwish", [conv(g, chain, 6, 6)])
    chain = g.op("Mul", [chain, g.op("HardSigmoid", [chain], alpha=1 / 6, beta=0.5)])
    chain = g.op("Clip", [chain, g.const(np.array(-1.0, np.float32)), g.const(np.array(2.0, np.float32))])
    chain = g.op("Clip", [chain, g.const(np.array(0.0, np.float32)), g.const(np.array(6.0, np.float32))])
    chain = g.op("Mul", [g.op("Tanh", [chain]), g.op("Sigmoid", [chain])])
    return image_model(g, g.op("Elu", [g.op("Sub", [chain, g.const(np.array(0.3, np.float32))])]), [1, 6, 8, 8])


@case
def broadcasting_math(g):
    c = conv(g, "x", 3, 4)
    y = g.op("Div", [c, g.op("Add", [g.op("Abs", [c]), g.const(np.ones((4, 1, 1), np.float32))])])
    y = g.op("Sub", [g.op("Pow", [y, g.const(np.array(2.0, np.float32))]), g.op("Sqrt", [g.op("Abs", [y])])])
    y = g.op("Max", [y, g.op("Neg", [y])])
    y = g.op("Add", [g.op("Exp", [g.op("Neg", [y])]), g.op("Reciprocal", [g.op("Add", [y, g.const(np.array(1.0, np.float32))])])])
    return image_model(g, y, [1, 4, 8, 8])


@case
def standalone_batchnorm_and_reduce(g):
    s = g.op("Add", [conv(g, "x", 3, 4), conv(g, "x", 3, 4)])
    bn = g.op("BatchNormalization", [s, g.const(np.ones(4, np.float32) * 2), g.weight(4), g.weight(4), g.const(np.ones(4, np.float32))])
    return g.model({"x": [1, 3, 8, 8]}, {g.op("ReduceSum", [bn, g.const(np.array([1], np.int64))], keepdims=1): [1, 1, 8, 8],
                                         g.op("ReduceMax", [bn], axes=[2, 3], keepdims=0): [1, 4]})


@case
def gather_pad_squeeze_transpose(g):
    c = conv(g, "x", 3, 6)
    picked = g.op("Gather", [c, g.const(np.array([5, 0, 2], np.int64))], axis=1)
    padded = g.op("Pad", [picked, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
    one = g.op("ReduceMean", [padded], axes=[1], keepdims=1)
    squeezed = g.op("Squeeze", [one, g.const(np.array([1], np.int64))])
    return image_model(g, g.op("Transpose", [squeezed], perm=[0, 2, 1]), [1, 10, 10])


@case
def batched_matmul_attention(g):
    q = g.op("MatMul", ["x", g.weight(16, 16)])
    k = g.op("MatMul", ["x", g.weight(16, 16)])
    scores = g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
    return g.model({"x": [1, 8, 16]}, {g.op("MatMul", [scores, q]): [1, 8, 16]})


@case
def einsum_attention(g):
    """MaxViT's and many transformers' exports: Einsum, with spaces and a constant operand."""
    q = g.op("Einsum", ["x", g.weight(16, 16)], equation="b i d, d e -> b i e")
    heads = g.op("Reshape", [q, g.const(np.array([1, 8, 2, 8], np.int64))])
    scores = g.op("Einsum", [heads, heads], equation="b i h d, b j h d -> b h i j")
    return g.model({"x": [1, 8, 16]}, {g.op("Softmax", [scores], axis=-1): [1, 2, 8, 8]})


@case
def attention_nan_guard_and_gather_nd(g):
    """torch.onnx (dynamo) attention: a fully masked softmax row is guarded by
    Where(IsNaN); BERT's mask and pooler index with GatherND (negative indices allowed)."""
    scores = g.op("Softmax", [g.op("MatMul", ["x", g.op("Transpose", ["x"], perm=[0, 2, 1])])], axis=-1)
    guarded = g.op("Where", [g.op("IsNaN", [scores]), g.const(np.zeros(1, np.float32)), scores])
    rows = g.op("GatherND", [guarded, g.const(np.array([[0, 3], [0, -1]], np.int64))])
    batched = g.op("GatherND", ["x", g.const(np.array([[[2], [-3]]], np.int64))], batch_dims=1)
    return g.model({"x": [1, 8, 16]}, {rows: [2, 8], batched: [1, 2, 16]})


def exported_group_norm(g, x, groups=2):
    """PyTorch's GroupNorm(groups, 8) on [1, 8, 8, 8]: Reshape to groups, InstanceNormalization
    (here with a scale and bias per group too), Reshape back, affine."""
    grouped = g.op("Reshape", [x, g.const(np.array([1, groups, -1], np.int64))])
    normed = g.op("InstanceNormalization", [grouped, g.const(np.linspace(0.5, 1.5, groups).astype(np.float32)), g.weight(groups)], epsilon=1e-5)
    back = g.op("Reshape", [normed, g.const(np.array([1, 8, 8, 8], np.int64))])
    return g.op("Add", [g.op("Mul", [back, g.weight(8, 1, 1)]), g.weight(8, 1, 1)])


@case
def group_norm_as_instance_norm(g):
    return image_model(g, conv(g, exported_group_norm(g, conv(g, "x", 3, 8)), 8, 4), [1, 4, 8, 8])


@case
def resize_nearest_and_align_corners(g):
    c = conv(g, "x", 3, 4)
    a = g.op("Resize", [c, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    b = g.op("Resize", [c, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear", coordinate_transformation_mode="align_corners")
    return g.model({"x": [1, 3, 8, 8]}, {a: [1, 4, 16, 16], b: [1, 4, 16, 16]})


@case
def depth_to_space(g):
    return image_model(g, g.op("DepthToSpace", [conv(g, "x", 3, 8)], blocksize=2, mode="DCR"), [1, 2, 16, 16])


@case
def pixel_shuffle(g):
    """PyTorch's PixelShuffle exports as DepthToSpace in CRD mode."""
    return image_model(g, g.op("DepthToSpace", [conv(g, "x", 3, 18)], blocksize=3, mode="CRD"), [1, 2, 24, 24])


@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern_lowers_exactly(name, tmp_path):
    lower(CASES[name](GraphBuilder()), tmp_path)


BETWEEN_CONVS = {"relu": lambda g, h: g.op("Relu", [h]), "exported_gelu": exported_gelu, "exported_group_norm": exported_group_norm}


@pytest.mark.parametrize("between", sorted(BETWEEN_CONVS))
def test_conv_chain_has_no_transpose_and_nhwc_io(between, tmp_path):
    """Also with GELU and GroupNorm, which edgec fuses from the exporters' forms first."""
    g = GraphBuilder()
    y = conv(g, BETWEEN_CONVS[between](g, conv(g, "x", 3, 8)), 8, 4)
    report = lower(image_model(g, y, [1, 4, 8, 8]), tmp_path)
    assert "TRANSPOSE" not in report["lowering"]["tflite_ops"]
    assert report["lowering"]["io"]["inputs"][0]["perm"] == [0, 2, 3, 1]


def test_keras_model_uses_real_layers(tmp_path):
    from edgec import model as edgec_model
    from edgec.build import canonicalize
    from edgec.lower.tflite import prepare

    g = GraphBuilder()
    dw = conv(g, conv(g, "x", 3, 8), 8, 8, group=8)
    y = g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [dw])]), g.weight(8, 4)])
    model, _ = canonicalize(edgec_model.load(save(image_model(g, y, [1, 4]), tmp_path)), {})
    keras_model = to_keras(prepare(model)[0]).model
    kinds = {type(layer).__name__ for layer in keras_model.layers}
    assert {"Conv2D", "DepthwiseConv2D", "GlobalAveragePooling2D", "Dense"} <= kinds
    assert sum(np.prod(w.shape) for w in keras_model.trainable_weights) > 0


def test_supported_ops_are_read_off_the_table():
    ops = supported_ops()
    assert "Conv" not in ops and "edgec.channels_last::Conv" in ops and "LayerNormalization" in ops


def test_unsupported_resize_mode_is_reported(tmp_path):
    g = GraphBuilder()
    y = g.op("Resize", [conv(g, "x", 3, 4), "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="cubic", name="bicubic_up")
    from edgec.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="mode 'cubic'") as info:
        lower(image_model(g, y, [1, 4, 16, 16]), tmp_path)
    assert info.value.node_name == "bicubic_up"


def test_a_resize_by_scales_given_as_data_says_so(tmp_path):
    """It was "no TFLite rule for this op" (the channels-last rule exists; this one cannot be channels-last)."""
    from edgec.errors import UnsupportedOpError

    g = GraphBuilder()
    y = g.op("Resize", ["x", "", "scales"], mode="nearest")
    model = g.model({"x": [1, 3, 8, 8], "scales": [4]}, {y: [1, 3, 16, 16]})
    np.savez(tmp_path / "inputs.npz", x=np.ones((1, 3, 8, 8), np.float32), scales=np.array([1, 1, 2, 2], np.float32))
    with pytest.raises(UnsupportedOpError, match="its scales is computed at run time; TFLite needs it constant"):
        build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "inputs.npz")))


@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern_lowers_to_int8(name, tmp_path):
    """Full-integer where TFLite has int8 kernels; every output keeps its direction (cosine).

    0.95 rather than the int8 default 0.98: these are random-weight graphs calibrated on
    random data, and an int8 Q·Kᵀ of random attention weights lands at ~0.965.
    """
    path = save(CASES[name](GraphBuilder()), tmp_path)
    # min_cosine 0: no precision search, so every op with an int8 kernel is int8; the bar is checked below.
    options = BuildOptions(seed=3, precision="int8", calib_samples=64, min_cosine=0.0)
    with pytest.warns(EdgecWarning, match="Calibrating with random inputs"):
        result = build(path, "tflite-arm", tmp_path / "out", options)
    assert result.report["calibration"]["real_data"] is False
    assert all(o.cosine >= 0.95 for o in result.verification.outputs), result.verification.to_dict()
    lowering = result.report["lowering"]
    assert not set(lowering["float_ops"]) & {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}, lowering["float_ops"]


def test_int8_io_artifact_takes_int8_and_runs_in_source_terms(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", [conv(g, "x", 3, 8)])
    path = save(image_model(g, y, [1, 8, 8, 8]), tmp_path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    options = BuildOptions(precision="int8", calib=str(calib), int8_io=True, speed_check=False)
    result = build(path, "tflite-x86", tmp_path / "out", options)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(result.artifacts[0]))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    assert result.report["calibration"]["real_data"] is True and not result.report["lowering"]["float_ops"]
    assert result.verification.outputs[0].cosine >= 0.99


def test_fp16_artifact_stores_half_weights_and_verifies(tmp_path):
    g = GraphBuilder()
    y = conv(g, g.op("Relu", [conv(g, "x", 3, 16)]), 16, 8)
    path = save(image_model(g, y, [1, 8, 8, 8]), tmp_path)
    fp32 = build(path, "tflite-arm", tmp_path / "fp32", BuildOptions())
    fp16 = build(path, "tflite-arm", tmp_path / "fp16", BuildOptions(precision="fp16"))
    from ai_edge_litert.interpreter import Interpreter

    types = {t["dtype"] for t in Interpreter(model_path=str(fp16.artifacts[0])).get_tensor_details()}
    assert np.float16 in types
    assert fp16.artifacts[0].stat().st_size < fp32.artifacts[0].stat().st_size
    assert fp16.report["verification"]["criterion"] == {"tolerance": 1e-2, "noise_floor": 1e-3, "float_noise_multiple": 2.0}
    assert fp16.verification.passed


def test_int8_calibration_feeds_each_input_by_name(tmp_path):
    """Inputs whose names sort unlike the model's input order ('a_bias' < 'x') still get
    their own calibration samples (the converter matched a list to its own input order)."""
    g = GraphBuilder()
    y = g.op("Add", [conv(g, "x", 3, 8), g.op("Reshape", ["a_bias", g.const(np.array([1, 8, 1, 1], np.int64))])])
    path = save(g.model({"x": [1, 3, 8, 8], "a_bias": [1, 8]}, {y: [1, 8, 8, 8]}), tmp_path)
    options = BuildOptions(precision="int8", calib_samples=8, min_cosine=0.0, speed_check=False)
    with pytest.warns(EdgecWarning, match="Calibrating with random inputs"):
        result = build(path, "tflite-x86", tmp_path / "out", options)
    assert result.verification.outputs[0].cosine >= 0.99


def test_conversion_skips_the_savedmodel_and_writes_the_signature(tmp_path, monkeypatch):
    """The converter runs on the frozen function, not a SavedModel written and read back
    (half of a small model's conversion time); the file still has the ``serving_default``
    signature runners find I/O by, and outputs named by their keys, with two outputs of
    different shapes in the right places."""
    from ai_edge_litert import schema_py_generated as tfl_schema
    from tensorflow.python.saved_model import save as saved_model

    saves, original = [], saved_model.save
    monkeypatch.setattr(saved_model, "save", lambda *args, **kwargs: saves.append(args) or original(*args, **kwargs))
    result = build(save(CASES["multiple_outputs"](GraphBuilder()), tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(seed=3))
    assert result.verification.passed and not saves
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(result.artifacts[0].read_bytes()), 0)
    graph, (signature,) = model.subgraphs[0], model.signatureDefs
    assert signature.signatureKey == b"serving_default"
    assert [e.tensorIndex for e in signature.inputs] == list(graph.inputs)
    assert [e.tensorIndex for e in signature.outputs] == list(graph.outputs)
    assert [e.name for e in signature.outputs] == [graph.tensors[i].name for i in graph.outputs]
    keys = {e["key"] for e in result.report["lowering"]["io"]["outputs"]}
    assert {e.name.decode() for e in signature.outputs} == keys and len(keys) == 2


def _run_integer_op(tmp_path, op_type: str, elem_type: int, out_elem_type: int | None = None) -> np.ndarray:
    """``op_type`` on DIVIDENDS and DIVISORS (as ``elem_type``) built for TFLite, run on them."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    feeds = {"x": np.array(DIVIDENDS).astype(dtype), "d": np.array(DIVISORS).astype(dtype)}  # uint8 wraps the negatives
    np.savez(tmp_path / "inputs.npz", **feeds)
    result = build(save(binary_op(op_type, elem_type, out_elem_type), tmp_path), "tflite-x86", tmp_path / "out",
                   BuildOptions(inputs=str(tmp_path / "inputs.npz")))
    return open_runner(result.artifacts[0]).run(feeds)["q"]


@pytest.mark.parametrize("elem_type", [TensorProto.INT32, TensorProto.INT8])
def test_integer_div_truncates_toward_zero(elem_type, tmp_path):
    """ONNX's integer Div truncates (7 / -2 = -3); the rule divided in float, and TFLite has
    no DIV kernel for int8 (computed in int32)."""
    quotient = _run_integer_op(tmp_path, "Div", elem_type)
    assert quotient.dtype == helper.tensor_dtype_to_np_dtype(elem_type) and quotient.tolist() == QUOTIENTS


@pytest.mark.parametrize("op_type", ["Equal", "Greater", "LessOrEqual"])
@pytest.mark.parametrize("elem_type", [TensorProto.UINT8, TensorProto.INT8])
def test_narrow_integer_comparisons_compute_in_int32(op_type, elem_type, tmp_path):
    """The converter refused int8 comparisons, and LiteRT aborted the process running a uint8
    EQUAL (ONNX's node tests)."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    x, d = np.array(DIVIDENDS).astype(dtype), np.array(DIVISORS).astype(dtype)
    expected = {"Equal": np.equal, "Greater": np.greater, "LessOrEqual": np.less_equal}[op_type](x, d)
    assert _run_integer_op(tmp_path, op_type, elem_type, TensorProto.BOOL).tolist() == expected.tolist()


def test_gather_counts_negative_indices_given_as_data_from_the_end(tmp_path):
    """TFLite's GATHER stopped the run ('gather index out of bounds') on -1 from the data."""
    g = GraphBuilder()
    table = g.weight(5, 3)
    graph = helper.make_graph(
        [helper.make_node("Gather", [table, "ids"], ["rows"], axis=0)], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 4, 3])], g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ids = np.array([[-1, 0, -5, 4]], np.int64)
    np.savez(tmp_path / "ids.npz", ids=ids)
    result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "ids.npz")))
    rows = open_runner(result.artifacts[0]).run({"ids": ids})["rows"]
    table_values = numpy_helper.to_array(g.initializers[0])
    np.testing.assert_allclose(rows[0], table_values[[4, 0, 0, 4]], rtol=1e-6)


def test_outputs_without_elements_are_read_as_empty(tmp_path):
    """An input without elements split in parts (ONNX's node tests): LiteRT refuses to hand
    out a tensor it allocated no memory for ("Invalid tensor size"), which made verification
    an internal error."""
    g = GraphBuilder()
    top, bottom = g.op("Split", ["x", g.const(np.array([1, 1], np.int64))], n_out=2, axis=0)
    model = g.model({"x": [2, 0]}, {top: [1, 0], bottom: [1, 0]})
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 0), np.float32))
    result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "x.npz")))
    assert result.verification.passed
    outputs = open_runner(result.artifacts[0]).run({"x": np.zeros((2, 0), np.float32)})
    assert outputs[top].shape == outputs[bottom].shape == (1, 0)


ONE_INPUT_OPS = {  # op → attributes; each built on [1, 3, 8, 8] and verified against ONNX Runtime
    "Mish": {}, "Selu": {"alpha": 1.5, "gamma": 1.1}, "Celu": {"alpha": 0.7}, "ThresholdedRelu": {"alpha": 0.3},
    "Shrink": {"bias": 0.2, "lambd": 0.4}, "Softsign": {},
}
REDUCE_OPS = ("ReduceL1", "ReduceLogSumExp")


@pytest.mark.parametrize("op_type", sorted(ONE_INPUT_OPS) + [f"{op}-keepdims-{k}" for op in REDUCE_OPS for k in (0, 1)])
def test_activations_and_reductions_lower_exactly(op_type, tmp_path):
    """Ops that had no TFLite rule (Mish is YOLOv4's activation; the reductions are sums of
    |x| and a log-sum-exp shifted by the maximum)."""
    g = GraphBuilder()
    op, _, keepdims = op_type.partition("-keepdims-")
    if keepdims:
        y = g.op(op, ["x", g.const(np.array([1, 3], np.int64))], keepdims=int(keepdims))
        shape = [1, 1, 8, 1] if keepdims == "1" else [1, 8]
    else:
        y, shape = g.op(op, ["x"], **ONE_INPUT_OPS[op]), [1, 3, 8, 8]
    lower(g.model({"x": [1, 3, 8, 8]}, {y: shape}, opset=18), tmp_path)


@pytest.mark.parametrize(("fmod", "elem_type", "expected"), [
    (0, TensorProto.INT32, [[1, 1, -1, -1, 2, 2]]),  # the divisor's sign
    (1, TensorProto.INT32, [[1, -1, 1, -1, 2, -1]]),  # the dividend's
    (1, TensorProto.FLOAT, [[1, -1, 1, -1, 2, -1]]),  # floats take fmod=1 only
])
def test_mod_takes_the_sign_fmod_asks_for(fmod, elem_type, expected, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Mod", ["x", "d"], ["q"], name="mod", fmod=fmod)], "mod",
        [helper.make_tensor_value_info(name, elem_type, [1, 6]) for name in ("x", "d")],
        [helper.make_tensor_value_info("q", elem_type, [1, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    feeds = {"x": np.array(DIVIDENDS).astype(dtype), "d": np.array(DIVISORS).astype(dtype)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "inputs.npz")))
    assert open_runner(result.artifacts[0]).run(feeds)["q"].tolist() == expected


def test_onnx_group_normalization_runs_channels_last(tmp_path):
    """ONNX's GroupNormalization op (opset 21) becomes edgec's fused GroupNorm, which runs
    channels-last: no TRANSPOSE."""
    g = GraphBuilder()
    normed = g.op("GroupNormalization", [conv(g, "x", 3, 8), g.const(np.linspace(0.5, 1.5, 8).astype(np.float32)),
                                         g.weight(8)], num_groups=2, epsilon=1e-5)
    y = conv(g, normed, 8, 4)
    graph = helper.make_graph(g.nodes, "gn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 8, 8])], g.initializers,
                              value_info=[helper.make_tensor_value_info(normed, TensorProto.FLOAT, [1, 8, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 8  # onnx's shape inference gives GroupNormalization's output a type but no shape: declared here
    report = lower(model, tmp_path)
    assert "TRANSPOSE" not in report["lowering"]["tflite_ops"]


@pytest.mark.parametrize("name", ["gather_elements", "trilu", "hardmax", "lrn", "eye_like"])
def test_more_ops_lower_exactly(name, tmp_path):
    """Ops the node-test sweep found without a rule: torch.gather's GatherElements (indices
    as data, negative ones counted from the end), Trilu (causal masks), Hardmax and AlexNet's LRN."""
    g = GraphBuilder()
    if name == "gather_elements":
        graph = helper.make_graph([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5]),
                                   helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        feeds = {"x": np.arange(10, dtype=np.float32).reshape(2, 5), "i": np.array([[0, -1, 2], [4, 4, -5]], np.int64)}
        np.savez(tmp_path / "inputs.npz", **feeds)
        result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "inputs.npz")))
        assert open_runner(result.artifacts[0]).run(feeds)["y"].tolist() == [[0, 4, 2], [9, 9, 5]]
        return
    if name == "trilu":
        y, shape = g.op("Trilu", ["x", g.const(np.array(-1, np.int64))], upper=0), [1, 3, 8, 8]
    elif name == "hardmax":
        y, shape = g.op("Hardmax", ["x"], axis=1), [1, 3, 8, 8]
    elif name == "eye_like":
        square = g.op("Reshape", ["x", g.const(np.array([24, 8], np.int64))])
        y, shape = g.op("Add", [square, g.op("EyeLike", [square], k=1)]), [24, 8]
    else:
        y, shape = g.op("LRN", [conv(g, "x", 3, 8)], size=5, alpha=1e-2, beta=0.75, bias=2.0), [1, 8, 8, 8]
    lower(g.model({"x": [1, 3, 8, 8]}, {y: shape}), tmp_path)


def test_slice_assignment_and_scatter_with_constant_indices_lower_exactly(tmp_path):
    """``y[..., :2] = sigmoid(y[..., :2]) * 2`` exports as ScatterND (YOLO-style heads), and
    ``torch.scatter`` as ScatterElements: with constant indices, the cells written are known."""
    g = GraphBuilder()
    head = g.op("Slice", ["x", g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64)), g.const(np.array([2], np.int64))])
    updates = g.op("Mul", [g.op("Sigmoid", [head]), g.const(np.array(2.0, np.float32))])
    cells = np.stack(np.meshgrid([0], range(4), range(2), indexing="ij"), axis=-1).astype(np.int64)  # [1, 4, 2, 3]
    assigned = g.op("ScatterND", ["x", g.const(cells), updates])
    scattered = g.op("ScatterElements", [assigned, g.const(np.array([[[1, -1]] * 4], np.int64)), g.weight(1, 4, 2)], axis=2)
    lower(g.model({"x": [1, 4, 6]}, {scattered: [1, 4, 6]}), tmp_path)


def test_rms_normalization_lowers_exactly(tmp_path):
    g = GraphBuilder()
    normed = g.op("RMSNormalization", ["x", g.const(np.linspace(0.5, 1.5, 16).astype(np.float32))], axis=-1, epsilon=1e-6)
    graph = helper.make_graph(g.nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info(normed, TensorProto.FLOAT, [1, 8, 16])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    lower(model, tmp_path)


@pytest.mark.parametrize("form", ["4d-bool-mask-causal-cache", "3d-float-mask-softcap"])
def test_attention_op_lowers_exactly(form, tmp_path):
    """ONNX's Attention op (opset 23): heads split from 3-D inputs, a key/value cache in front,
    boolean or additive masks (a constant one too), the causal triangle, softcap."""
    g = GraphBuilder()
    if form.startswith("4d"):
        inputs = {"q": [1, 2, 4, 8], "k": [1, 2, 4, 8], "v": [1, 2, 4, 8], "past_key": [1, 2, 3, 8], "past_value": [1, 2, 3, 8]}
        mask = g.const(np.tril(np.ones((4, 7), bool), k=4))
        node = helper.make_node("Attention", ["q", "k", "v", mask, "past_key", "past_value"], ["y", "present_key", "present_value"],
                                is_causal=1)
        outputs = {"y": [1, 2, 4, 8], "present_key": [1, 2, 7, 8], "present_value": [1, 2, 7, 8]}
    else:
        inputs = {"q": [1, 4, 12], "k": [1, 6, 12], "v": [1, 6, 12], "mask": [4, 6]}
        node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], q_num_heads=3, kv_num_heads=3, softcap=2.0, scale=0.3)
        outputs = {"y": [1, 4, 12]}
    graph = helper.make_graph([node], "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    lower(model, tmp_path)


@pytest.mark.parametrize(("interleaved", "rotated"), [(0, 0), (1, 0), (0, 4), (1, 4)])
def test_rotary_embedding_lowers_exactly(interleaved, rotated, tmp_path):
    """RotaryEmbedding (opset 23) on [B, S, hidden] with constant caches read at position ids
    given as data; a partial rotation (ONNX Runtime 1.23 refuses one) against onnx's reference."""
    from onnx.reference import ReferenceEvaluator

    from edgec.lower import lower as lower_model
    from edgec.model import load
    from edgec.runtime.litert import LiteRTRunner
    from edgec.stages.source import canonicalize
    from edgec.targets import load_target

    g = GraphBuilder()
    half = (rotated or 8) // 2
    angles = np.outer(np.arange(10), 1.0 / 100 ** (np.arange(half) / half)).astype(np.float32)
    node = helper.make_node("RotaryEmbedding", ["x", g.const(np.cos(angles)), g.const(np.sin(angles)), "ids"], ["y"],
                            num_heads=2, interleaved=interleaved, rotary_embedding_dim=rotated)
    graph = helper.make_graph([node], "rope", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16]),
                                                helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32), "ids": np.array([[3, 4, 5, 9]], np.int64)}
    if not rotated:
        np.savez(tmp_path / "inputs.npz", **feeds)
        result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "inputs.npz")))
        assert result.verification.passed and result.verification.outputs[0].relative_error <= 1e-5
        return
    canonical, _ = canonicalize(load(save(model, tmp_path)), {})
    lowered = lower_model(canonical, load_target("tflite-x86"), "m")
    got = LiteRTRunner(lowered.files[lowered.primary]).run(feeds)["y"]
    np.testing.assert_allclose(got, ReferenceEvaluator(model).run(None, feeds)[0], atol=1e-6)


@pytest.mark.parametrize(("mode", "padding_mode", "align_corners"), [("linear", "zeros", 0), ("linear", "border", 1), ("nearest", "zeros", 1)])
def test_grid_sample_lowers_exactly(mode, padding_mode, align_corners, tmp_path):
    """GridSample (spatial transformers, flow warping) of a conv's output at points given as data."""
    g = GraphBuilder()
    y = g.op("GridSample", [conv(g, "x", 3, 4), "grid"], mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    model = g.model({"x": [1, 3, 8, 8], "grid": [1, 5, 6, 2]}, {y: [1, 4, 5, 6]}, opset=20)
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "grid": rng.uniform(-1.2, 1.2, (1, 5, 6, 2)).astype(np.float32)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    result = build(save(model, tmp_path), "tflite-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "inputs.npz")))
    assert result.verification.passed and result.verification.outputs[0].relative_error <= 1e-4
