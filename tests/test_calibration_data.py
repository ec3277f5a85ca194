"""Calibration and input data that users get wrong: every case is an InputDataError that names
the file or sample, the array and what was expected. Also: detecting already-quantized models."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, save
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from edgec.analysis import quantized_nodes
from edgec.errors import EdgecError, InputDataError, QuantizationError
from edgec.runtime import TensorSpec
from edgec.verify import load_calibration, load_inputs

F32 = np.dtype(np.float32)
SPEC = [TensorSpec("x", (2, 3), F32)]
IMAGE = [TensorSpec("img", (1, 3, 4, 4), F32)]
TWO = [TensorSpec("a", (1, 3), F32), TensorSpec("b", (1, 2), np.dtype(np.int64))]


def _npz(tmp_path, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return tmp_path / "d.npz"


def _raises(call, *fragments: str):
    """Run ``call``; it must raise InputDataError whose message and hint hold every fragment."""
    with pytest.raises(InputDataError) as info:
        call()
    text = str(info.value)
    assert info.value.hint, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    return text


# --- files -----------------------------------------------------------------------------------

def test_npz_names_that_do_not_match_list_both_sides(tmp_path):
    path = _npz(tmp_path, y=np.zeros((4, 3), np.float32))
    _raises(lambda: load_inputs(path, SPEC), "d.npz", "no array for input(s) ['x']", "holds ['y']", "'x' [2, 3] float32")


def test_per_sample_shape_mismatch_gives_shapes_with_and_without_batch_axis(tmp_path):
    path = _npz(tmp_path, x=np.zeros((4, 5), np.float32))
    _raises(lambda: load_inputs(path, SPEC), "d.npz", "'x'", "shape [4, 5]", "expected [N, 3]", "[3]", "[2, 3]")


def test_one_sample_without_batch_axis_is_told_to_add_it(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((3, 4, 4), np.float32))
    _raises(lambda: load_inputs(tmp_path / "d.npy", IMAGE), "shape [3, 4, 4]", "[1, 3, 4, 4]", "array[None]")


@pytest.mark.parametrize("array, spec, words", [
    (np.zeros((4, 3), np.int64), SPEC, ["dtype int64", "floating-point", "float32", "astype(np.float32)"]),
    (np.zeros((4, 3), np.uint8), SPEC, ["dtype uint8", "pixels"]),
    (np.zeros((4, 2), np.float32), [TensorSpec("x", (1, 2), np.dtype(np.int64))], ["dtype float32", "integer", "int64"]),
    (np.zeros((4, 2), "U3"), [TensorSpec("x", (1, 2), np.dtype(np.int64))], ["dtype <U3", "integer"]),
])
def test_wrong_dtype(tmp_path, array, spec, words):
    _raises(lambda: load_inputs(_npz(tmp_path, x=array), spec), "d.npz", "'x'", *words)


def test_nan_and_inf_are_counted_per_array(tmp_path):
    x = np.zeros((4, 3), np.float32)
    x[0, 0] = x[1, 1] = np.nan
    x[2, 2] = -np.inf
    _raises(lambda: load_inputs(_npz(tmp_path, x=x), SPEC), "'x'", "d.npz", "2 NaN and 1 infinite", "out of 12")


def test_npz_with_zero_samples(tmp_path):
    _raises(lambda: load_inputs(_npz(tmp_path, x=np.zeros((0, 3), np.float32)), SPEC), "'x'", "zero samples")
    np.savez(tmp_path / "none.npz")
    _raises(lambda: load_inputs(tmp_path / "none.npz", SPEC), "none.npz", "no arrays", "'x'")


def test_fewer_samples_than_one_batch(tmp_path):
    _raises(lambda: load_inputs(_npz(tmp_path, x=np.zeros((1, 3), np.float32)), SPEC), "1 samples", "batch of 2")


def test_npy_for_a_model_with_several_inputs(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((1, 3), np.float32))
    _raises(lambda: load_inputs(tmp_path / "d.npy", TWO), "d.npy", "2 inputs", ".npz")


def test_numpy_format_is_read_by_content_not_suffix(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((4, 3), np.float32))
    (tmp_path / "d.npy").rename(tmp_path / "really_npy.npz")
    assert len(load_inputs(tmp_path / "really_npy.npz", SPEC).batches) == 2


def test_missing_and_unreadable_files(tmp_path):
    _raises(lambda: load_inputs(tmp_path / "nope.npz", SPEC), "nope.npz", "No such")
    (tmp_path / "d.csv").write_text("1,2,3\n")
    _raises(lambda: load_inputs(tmp_path / "d.csv", SPEC), "d.csv", "Cannot read", "numpy.savez")


# --- image folders ---------------------------------------------------------------------------

def test_empty_folder_names_the_accepted_suffixes(tmp_path):
    _raises(lambda: load_inputs(tmp_path, IMAGE), "holds no images", "is empty", ".jpg", ".png")


def test_folder_without_image_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "cats").mkdir()
    _raises(lambda: load_inputs(tmp_path, IMAGE), "holds no images", "only: cats, notes.txt", ".jpeg", "subfolders")


def test_folder_of_unreadable_images(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    _raises(lambda: load_inputs(tmp_path, IMAGE), "Cannot read image", "a.jpg", ".png")


@pytest.mark.parametrize("specs", [
    [TensorSpec("tokens", (1, 8, 16), F32)],
    [TensorSpec("img", (1, 3, 4, 4), np.dtype(np.int64))],
    [TensorSpec("img", (1, 3, "h", "w"), F32)],
    IMAGE + IMAGE,
])
def test_folder_for_a_model_without_one_image_input(tmp_path, specs):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    _raises(lambda: load_inputs(tmp_path, specs), "image folder", "one float image input", "C = 1 or 3", ".npz")


# --- callables -------------------------------------------------------------------------------

def test_calibration_from_a_path_is_load_inputs(tmp_path):
    inputs = load_calibration(_npz(tmp_path, x=np.zeros((8, 3), np.float32)), SPEC, limit=3)
    assert len(inputs.batches) == 3 and inputs.source == "file d.npz (3 batches)"


def test_calibration_callable_of_dicts_and_of_bare_arrays():
    def samples():
        return [{"a": np.ones((1, 3), np.float64), "b": np.array([[1, 2]], np.int32), "extra": 0}] * 2

    inputs = load_calibration(samples, TWO)
    assert inputs.source == "callable samples (2 batches)" and inputs.labels is None
    assert inputs.batches[0]["a"].dtype == np.float32 and inputs.batches[0]["b"].dtype == np.int64
    single = load_calibration(lambda: (np.zeros((2, 3), np.float32) for _ in range(3)), SPEC)
    assert single.source == "callable <lambda> (3 batches)" and single.batches[2]["x"].shape == (2, 3)


def test_calibration_callable_respects_limit_and_stays_lazy():
    endless = lambda: ({"x": np.full((2, 3), i, np.float32)} for i in itertools.count())  # noqa: E731
    inputs = load_calibration(endless, SPEC, limit=5)
    assert len(inputs.batches) == 5 and inputs.batches[4]["x"][0, 0] == 4


@pytest.mark.parametrize("source, specs, words", [
    (lambda: [], SPEC, ["'<lambda>'", "no samples"]),
    (lambda: {"x": np.zeros((2, 3), np.float32)}, SPEC, ["returned a dict", "not an iterable of samples"]),
    (lambda: None, SPEC, ["returned a NoneType"]),
    ([{"x": np.zeros((2, 3), np.float32)}], SPEC, ["path or a callable", "list"]),
    (lambda: [np.zeros((1, 3), np.float32)], TWO, ["sample 0", "ndarray", "2 inputs", "['a', 'b']"]),
    (lambda: [{"a": np.zeros((1, 3), np.float32)}], TWO, ["Sample 0 of calibration callable", "no array for input(s) ['b']", "holds ['a']"]),
    (lambda: [{"x": np.zeros((2, 3), np.float32)}, {"x": np.zeros(3, np.float32)}], SPEC,
     ["sample 1", "shape [3]", "[2, 3]", "batch axis", "array[None]"]),
    (lambda: [{"x": np.zeros((4, 3), np.float32)}], SPEC, ["sample 0", "shape [4, 3]", "exactly the input shape [2, 3]"]),
    (lambda: [{"x": np.zeros((2, 3), np.int32)}], SPEC, ["sample 0", "dtype int32", "float32"]),
    (lambda: [{"x": np.full((2, 3), np.nan, np.float32)}], SPEC, ["sample 0", "'x'", "6 NaN"]),
])
def test_bad_calibration_callables(source, specs, words):
    _raises(lambda: load_calibration(source, specs), *words)


# --- already-quantized models ----------------------------------------------------------------

def _float_conv(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3), g.weight(4)], name="conv", pads=[1, 1, 1, 1])])
    return save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]}), tmp_path, "float")


@pytest.mark.parametrize("format_name, expected_op", [("QDQ", "DequantizeLinear"), ("QOperator", "QLinearConv")])
def test_quantize_static_output_is_detected_and_the_float_model_is_not(tmp_path, format_name, expected_op):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        feeds = iter([{"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}] * 2)

        def get_next(self):
            return next(self.feeds, None)

    reader = Reader()
    source, quantized = _float_conv(tmp_path), tmp_path / "int8.onnx"
    quantize_static(str(source), str(quantized), reader, quant_format=getattr(QuantFormat, format_name))
    assert quantized_nodes(ir.load(source)) == []
    model = ir.load(quantized)
    found = quantized_nodes(model)
    assert found and {n.op_type for n in model.graph if n.name in found} >= {expected_op}


def _one_node(op_type, weight, domain="", constant_node=False):
    """x -> op(x, w) with ``weight`` as an initializer or a Constant node; not checked on purpose."""
    w = numpy_helper.from_array(weight, "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=w)] if constant_node else []
    nodes.append(helper.make_node(op_type, ["x", "w"], ["y"], name="n", domain=domain))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [] if constant_node else [w])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


@pytest.mark.parametrize("op_type, weight, domain, constant_node, quantized", [
    ("MatMulInteger", np.zeros((4, 2), np.int8), "", False, True),
    ("ConvInteger", np.zeros((2, 4), np.uint8), "", False, True),
    ("QGemm", np.zeros((4, 2), np.int8), "com.microsoft", False, True),
    ("QLinearAdd", np.zeros((4, 2), np.float32), "com.microsoft", False, True),
    ("QAttention", np.zeros((4, 2), np.int8), "com.microsoft", False, True),
    ("Conv", np.zeros((2, 4), np.int8), "", False, True),
    ("MatMul", np.zeros((4, 2), np.uint8), "", True, True),
    ("Gemm", np.zeros((4, 2), np.float32), "", False, False),
    ("Gather", np.zeros((4, 2), np.int8), "", False, False),
])
def test_quantized_ops_and_integer_weights(op_type, weight, domain, constant_node, quantized):
    assert quantized_nodes(_one_node(op_type, weight, domain, constant_node)) == (["n"] if quantized else [])


def test_quantization_error_is_a_user_error():
    error = QuantizationError("The model is already quantized.", hint="Give edgec the float model.")
    assert isinstance(error, EdgecError) and error.exit_code == 2 and "float model" in str(error)
