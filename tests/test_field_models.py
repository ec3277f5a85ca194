"""Models as the field exports them build and verify on every target, without a flag.

A PyTorch ViT (``models/field/vit.onnx``: LayerNormalization, Erf, a ConstantOfShape and Shape
arithmetic under a symbolic batch), a tf2onnx-style NHWC classifier with batch ``unk__123``,
a model whose declared shapes are stale, one with a near-constant head whose error is
float noise, and the ``If``/LSTM patterns of PyTorch RNN exports (Silero VAD). Each is small:
the whole file takes under a minute on 2 cores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import REPO
from helpers import GraphBuilder, save

from edgec.build import build
from edgec.errors import EdgecWarning, UnsupportedOpError
from edgec.passes import simplifier
from edgec.targets import known_targets
from edgec.verify import Criterion, compare_outputs

VIT = REPO / "models" / "field" / "vit.onnx"


def tf2onnx_classifier() -> onnx.ModelProto:
    """What tf2onnx makes of a Keras CNN with an unknown batch: NHWC in, Transposes around the
    conv, and a Flatten that reads the batch from Shape."""
    g = GraphBuilder()
    nchw = g.op("Transpose", ["input_1"], perm=[0, 3, 1, 2])
    conv = g.op("Relu", [g.op("Conv", [nchw, g.weight(8, 3, 3, 3), g.weight(8)], pads=[1, 1, 1, 1])])
    nhwc = g.op("Transpose", [conv], perm=[0, 2, 3, 1])
    batch = g.op("Gather", [g.op("Shape", [nhwc]), g.const(np.array([0], np.int64))], axis=0)
    flat = g.op("Reshape", [nhwc, g.op("Concat", [batch, g.const(np.array([-1], np.int64))], axis=0)])
    logits = g.op("Add", [g.op("MatMul", [flat, g.weight(8 * 8 * 8, 10, scale=0.05)]), g.weight(10)])
    return g.model({"input_1": ["unk__123", 8, 8, 3]}, {g.op("Softmax", [logits], axis=-1): ["unk__123", 10]})


def stale_declared_shapes() -> onnx.ModelProto:
    """Conv → Reshape declaring its output 1x? (it computes 1x8x64) and an intermediate
    1x8x4x4 (it is 1x8x8x8), as old exporters left them."""
    g = GraphBuilder()
    r = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1])])
    y = g.op("Reshape", [r, g.const(np.array([1, 8, -1], np.int64))])
    make = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(g.nodes, "stale", [make("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [make(y, onnx.TensorProto.FLOAT, [1, "?"])], g.initializers,
                                   value_info=[make(r, onnx.TensorProto.FLOAT, [1, 8, 4, 4])])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def near_constant_head() -> onnx.ModelProto:
    """Features of order 1 and a head that is the difference of two convs whose weights differ
    by one part in a million: values near 1e-6, computed by cancellation, so any other
    summation order changes them by a large fraction of themselves."""
    g = GraphBuilder()
    weight = g.rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    features = g.op("Conv", ["x", g.const(weight)], pads=[1, 1, 1, 1])
    nudged = g.op("Conv", ["x", g.const(weight * np.float32(1 + 1e-6))], pads=[1, 1, 1, 1])
    head = g.op("Sub", [nudged, features])
    return g.model({"x": [1, 3, 8, 8]}, {features: [1, 4, 8, 8], head: [1, 4, 8, 8]})


def rnn_with_branches(constant_condition: bool = False) -> onnx.ModelProto:
    """As PyTorch exports an RNN with data-dependent control flow (Silero VAD): an LSTM with its
    optional ``sequence_lens`` input and ``Y`` output left unnamed, and ``If`` nodes whose
    then-branch passes a value of the main graph through while the else-branch computes from
    it, every else-branch naming its own ``Shape`` value alike."""
    g = GraphBuilder()
    w, r, b = g.weight(1, 16, 3), g.weight(1, 16, 4), g.weight(1, 32)
    y_h = g.op("LSTM", ["x", w, r, b, "", g.weight(1, 1, 4)], n_out=2, hidden_size=4)[1]
    g.nodes[-1].output[0] = ""
    if constant_condition:
        condition = g.const(np.array(True))
    else:
        condition = g.op("Greater", [g.op("ReduceSum", ["x"], keepdims=0), g.const(np.array(0, np.float32))])
    branches = []
    for i in range(6):  # several, so a node order blind to what branches read misplaces one
        outer = g.op("Add", [y_h, g.weight(1, 1, 4)])
        make = onnx.helper.make_node
        then = _branch([make("Identity", [outer], [f"then{i}"])])
        else_ = _branch([make("Shape", [outer], ["shape"]), make("Reshape", [outer, "shape"], ["same"]),
                         make("Mul", ["same", outer], [f"else{i}"])])
        branches.append(g.op("If", [condition], name=f"branch{i}", then_branch=then, else_branch=else_))
    return g.model({"x": [5, 1, 3]}, {g.op("Sum", branches): None})


def _branch(nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
    output = onnx.helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)
    return onnx.helper.make_graph(nodes, "branch", [], [output])


def _saved(tmp_path, make) -> str:
    return save(make(), tmp_path, make.__name__)


@pytest.mark.filterwarnings("ignore::edgec.errors.EdgecWarning")  # the notes are checked below
@pytest.mark.parametrize("target", known_targets())
@pytest.mark.parametrize("make", [tf2onnx_classifier, stale_declared_shapes, near_constant_head])
def test_field_model_builds_on_every_target(make, target, tmp_path):
    result = build(_saved(tmp_path, make), target, tmp_path / "out")
    assert result.verification.passed


@pytest.mark.parametrize("target", known_targets())
def test_pytorch_vit_with_symbolic_batch_builds_on_every_target(target, tmp_path):
    with pytest.warns(EdgecWarning, match="Built for batch size 1.*'image' \\(batch\\)"):
        result = build(VIT, target, tmp_path / "out")
    assert result.verification.passed
    assert result.report["notes"] and result.verification.outputs[0].shape == [1, 10]


def test_stale_declared_shapes_are_replaced_and_noted(tmp_path):
    proto = stale_declared_shapes()
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    with pytest.warns(EdgecWarning, match=r"output '\S+' is declared 1x\? but computes 1x8x64; 1 intermediate"):
        result = build(save(proto, tmp_path), "ort-x86", tmp_path / "out")
    inferred = next(p for p in result.report["passes"] if p["name"] == "infer-shapes")["details"]
    assert inferred["stale_outputs"] == {proto.graph.output[0].name: {"declared": "1x?", "inferred": "1x8x64"}}
    assert inferred["stale_intermediates"] == 1


def test_near_constant_head_passes_by_the_noise_floor_alone(tmp_path):
    """Its relative error is far above the tolerance; only the floor accepts it."""
    result = build(_saved(tmp_path, near_constant_head), "tflite-x86", tmp_path / "out")
    features, head = result.verification.outputs
    assert head.relative_error > 1e-2 and head.max_abs_reference < 1e-4 < features.max_abs_reference
    assert result.verification.criterion.noise_floor == 1e-6
    assert head.max_abs_error <= 1e-6 * features.max_abs_reference


def test_noise_floor_is_relative_to_the_largest_output_of_the_model():
    ref = {"big": np.array([[100.0, -3.0]]), "small": np.array([[1e-6, 2e-6]])}
    got = {"big": ref["big"] + 1e-3, "small": ref["small"] + 5e-5}
    criterion = Criterion(tolerance=1e-4, noise_floor=1e-6)
    assert [c.passed for c in compare_outputs(ref, got, None, criterion)] == [True, True]
    assert [c.passed for c in compare_outputs({"small": ref["small"]}, {"small": got["small"]}, None, criterion)] == [False]
    assert "or abs err ≤ 1e-06 × the model's largest |output|" in criterion.describe()
    exact = Criterion(tolerance=0.0, noise_floor=1e-6)  # the floor never loosens the tolerance
    assert [c.passed for c in compare_outputs(ref, {"big": ref["big"], "small": got["small"]}, None, exact)] == [True, False]


def test_failing_simplifier_falls_back_with_a_note(tmp_path, monkeypatch):
    """onnxsim raising anything leaves the build to edgec's own folder; the ViT still lowers
    (its ConstantOfShape, which that folder leaves, is evaluated by the TFLite lowering)."""
    def broken(proto, tensor_size_threshold):
        raise simplifier.SimplifierFailed("IndexError: Input 371 is undefined!")

    monkeypatch.setattr(simplifier, "simplify", broken)
    with pytest.warns(EdgecWarning, match=r"onnxsim could not simplify the model \(IndexError: Input 371"):
        result = build(VIT, "tflite-x86", tmp_path / "out")
    assert result.verification.passed
    simplify = next(p for p in result.report["passes"] if p["name"] == "simplify")["details"]
    assert simplify["fallback"] == "IndexError: Input 371 is undefined!"
    assert any("onnxsim" in note for note in json.loads(result.report_path.read_text())["notes"])


@pytest.mark.parametrize("target", ["ort-x86", "ort-arm"])
def test_rnn_with_runtime_branches_builds_for_onnx_runtime(target, tmp_path):
    proto = rnn_with_branches()
    with pytest.raises(onnx.shape_inference.InferenceError, match="already exists"):
        onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    result = build(save(proto, tmp_path), target, tmp_path / "out")
    assert result.verification.passed
    assert next(p for p in result.report["passes"] if p["name"] == "unique-names")["details"]["renamed"] == 2 * 5  # shape, same


def test_runtime_branch_is_refused_by_tflite_naming_the_node(tmp_path):
    with pytest.raises(UnsupportedOpError, match="If") as info:
        build(save(rnn_with_branches(), tmp_path), "tflite-x86", tmp_path / "out")
    assert info.value.node_name == "branch0"


def test_constant_branch_is_folded_away_for_tflite(tmp_path):
    result = build(save(rnn_with_branches(constant_condition=True), tmp_path), "tflite-x86", tmp_path / "out")
    assert result.verification.passed and "If" not in json.dumps(result.report["lowering"])
