"""LSTM and GRU on the TFLite targets: each configuration exporters emit must build and
match ONNX Runtime on the source (the build verifies within 1e-4 × max|output| on several
inputs in one interpreter, so state left over from a previous run fails it), and what Keras
cannot express must be refused naming the node."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import REPO
from helpers import GraphBuilder, random_feeds, run_ort, save
from onnx import numpy_helper

from edgec import model as edgec_model
from edgec.analysis import layer_table
from edgec.build import BuildOptions, build, canonicalize
from edgec.errors import EdgecWarning, UnsupportedOpError
from edgec.lower.tflite import prepare, to_keras
from edgec.lower.tflite.ops import recurrent as recurrent_rules
from edgec.recipe import Step
from edgec.targets import known_targets

SEQ, BATCH, FEATURES, HIDDEN = 5, 2, 3, 4
GATES = {"LSTM": 4, "GRU": 3}


def recurrent(g, op, x="x", *, dirs=1, states=(), seq_lens=None, outputs=1, hidden=HIDDEN, features=FEATURES, **attrs):
    """An ONNX LSTM/GRU node on ``x`` with seeded random weights and biases."""
    gates = GATES[op]
    w, r = g.weight(dirs, gates * hidden, features), g.weight(dirs, gates * hidden, hidden)
    inputs = [x, w, r, g.weight(dirs, 2 * gates * hidden), seq_lens or "", *states]
    return g.op(op, inputs, n_out=outputs, hidden_size=hidden, **attrs)


def x_shape(layout=0, seq=SEQ):
    return [seq, BATCH, FEATURES] if layout == 0 else [BATCH, seq, FEATURES]


def lower(proto, tmp_path, target="tflite-x86"):
    result = build(save(proto, tmp_path), target, tmp_path / "out", BuildOptions(seed=3))
    assert result.verification.passed
    assert all(o.relative_error <= 1e-4 for o in result.verification.outputs)
    return result.report["lowering"]["tflite_ops"]


def test_short_lstm_is_unrolled_not_the_stateful_fused_op(tmp_path):
    g = GraphBuilder()
    y = recurrent(g, "LSTM", "x")
    ops = lower(g.model({"x": x_shape()}, {y: None}), tmp_path)
    assert not {"UNIDIRECTIONAL_SEQUENCE_LSTM", "WHILE"} & set(ops) and ops["FULLY_CONNECTED"] >= SEQ


def test_bidirectional_lstm_with_state_inputs_and_final_hidden_state(tmp_path):
    g = GraphBuilder()
    y, y_h = recurrent(g, "LSTM", "x", dirs=2, states=["h0", "c0"], outputs=2, direction="bidirectional")
    state = [2, BATCH, HIDDEN]
    model = g.model({"x": x_shape(), "h0": state, "c0": state}, {y: None, y_h: None})
    lower(model, tmp_path)


def test_reverse_lstm_with_constant_states_and_all_outputs(tmp_path):
    g = GraphBuilder()
    h0 = g.weight(1, BATCH, HIDDEN)
    y, y_h, y_c = recurrent(g, "LSTM", "x", states=[h0], outputs=3, direction="reverse")
    lower(g.model({"x": x_shape()}, {y: None, y_h: None, y_c: None}), tmp_path)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_layout_matches_the_same_net_time_first(op, tmp_path):
    """ONNX Runtime refuses layout=1, so the Keras model is compared with ORT running the
    layout=0 equivalent (same weights, transposes around it)."""
    state = [BATCH, 2, HIDDEN]
    g = GraphBuilder()
    outputs = recurrent(g, op, "x", dirs=2, states=["h0"], outputs=2, direction="bidirectional", layout=1)
    batch_first = g.model({"x": x_shape(layout=1), "h0": state}, dict.fromkeys(outputs))
    g = GraphBuilder()
    x, h0 = g.op("Transpose", ["x"], perm=[1, 0, 2]), g.op("Transpose", ["h0"], perm=[1, 0, 2])
    y, y_h = recurrent(g, op, x, dirs=2, states=[h0], outputs=2, direction="bidirectional")
    time_first = g.model({"x": x_shape(layout=1), "h0": state},
                         {g.op("Transpose", [y], perm=[2, 0, 1, 3]): None, g.op("Transpose", [y_h], perm=[1, 0, 2]): None})
    model, _ = canonicalize(edgec_model.load(save(batch_first, tmp_path)), {})
    keras_model = to_keras(prepare(model)[0]).model
    feeds = random_feeds(time_first)
    got = keras_model([feeds[t.name.split(":")[0]] for t in keras_model.inputs])
    for want, have in zip(run_ort(time_first, feeds), got):
        np.testing.assert_allclose(have.numpy(), want, atol=1e-5)


def test_lstm_with_full_sequence_lengths_and_zero_states(tmp_path):
    g = GraphBuilder()
    lens = g.const(np.full(BATCH, SEQ, np.int32))
    zeros = g.const(np.zeros((1, BATCH, HIDDEN), np.float32))
    y = recurrent(g, "LSTM", "x", seq_lens=lens, states=[zeros, zeros], activations=["Sigmoid", "Tanh", "Tanh"])
    lower(g.model({"x": x_shape()}, {y: None}), tmp_path)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_bidirectional_gru_is_unrolled(linear_before_reset, tmp_path):
    g = GraphBuilder()
    y, y_h = recurrent(g, "GRU", "x", dirs=2, outputs=2, direction="bidirectional", linear_before_reset=linear_before_reset)
    ops = lower(g.model({"x": x_shape()}, {y: None, y_h: None}), tmp_path)
    assert "WHILE" not in ops and ops["FULLY_CONNECTED"] >= 2 * SEQ


def test_long_sequences_loop_in_float_and_unroll_for_int8(monkeypatch, tmp_path):
    """TF 2.19's int8 calibration segfaults on a WHILE loop, so int8 never gets one."""
    monkeypatch.setattr(recurrent_rules, "MAX_UNROLLED_STEPS", SEQ - 1)
    g = GraphBuilder()
    y_h = recurrent(g, "GRU", "x", states=["h0"], outputs=2, direction="reverse", linear_before_reset=1)[1]
    model = g.model({"x": x_shape(), "h0": [1, BATCH, HIDDEN]}, {y_h: None})
    assert lower(model, tmp_path).get("WHILE") == 1
    options = BuildOptions(seed=3, precision="int8", calib_samples=16, min_cosine=0.0, speed_check=False)
    with pytest.warns(EdgecWarning, match="Calibrating with random inputs"):
        result = build(save(model, tmp_path), "tflite-x86", tmp_path / "int8", options)
    assert "WHILE" not in result.report["lowering"]["tflite_ops"] and result.verification.outputs[0].cosine >= 0.95


@pytest.mark.parametrize(
    "op, attrs, match",
    [
        ("LSTM", {"clip": 3.0}, "clip=3.0"),
        ("LSTM", {"input_forget": 1}, "input_forget=1"),
        ("GRU", {"activations": ["Sigmoid", "Relu"]}, "activations"),
        ("LSTM", {"seq_lens": np.array([SEQ, 2], np.int32)}, "sequence_lens"),
    ],
)
def test_what_keras_cannot_express_is_refused_naming_the_node(op, attrs, match, tmp_path):
    g = GraphBuilder()
    lens = attrs.pop("seq_lens", None)
    y = recurrent(g, op, "x", seq_lens=None if lens is None else g.const(lens), name="rnn", **attrs)
    with pytest.raises(UnsupportedOpError, match=match) as info:
        lower(g.model({"x": x_shape()}, {y: None}), tmp_path)
    assert info.value.node_name == "rnn"


def test_peepholes_are_refused(tmp_path):
    g = GraphBuilder()
    y = recurrent(g, "LSTM", "x", states=["", "", g.weight(1, 3 * HIDDEN)], name="peephole_lstm")
    with pytest.raises(UnsupportedOpError, match="peephole"):
        lower(g.model({"x": x_shape()}, {y: None}), tmp_path)


CRNNS = ["crnn_lstm", "crnn_bilstm"]  # made by models/make_crnn.py
EVAL = str(REPO / "models" / "data" / "digits_eval_nchw.npz")


@pytest.mark.parametrize("target", known_targets())
@pytest.mark.parametrize("name", CRNNS)
def test_crnn_builds_and_verifies_on_every_target(name, target, tmp_path):
    path = REPO / "models" / f"{name}.onnx"
    assert {"LSTM", "Conv"} <= {n.op_type for n in onnx.load(path).graph.node}
    result = build(path, target, tmp_path / "out", BuildOptions(inputs=EVAL, max_samples=16))
    assert result.verification.passed
    assert all(o.relative_error <= 1e-4 for o in result.verification.outputs)


def _with_stale_shapes(path) -> onnx.ModelProto:
    """The CRNN as a PyTorch 1.9 export declares it: its output ``1x?`` (it computes 8x1x11)
    and the LSTM's ``Y`` 1x1x1x1."""
    proto = onnx.load(path)
    make = onnx.helper.make_tensor_value_info
    proto.graph.output[0].CopyFrom(make(proto.graph.output[0].name, onnx.TensorProto.FLOAT, [1, "?"]))
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    proto.graph.value_info.append(make(lstm.output[0], onnx.TensorProto.FLOAT, [1, 1, 1, 1]))
    return proto


@pytest.mark.parametrize("target", known_targets())
@pytest.mark.parametrize("name", CRNNS)
def test_crnn_with_stale_declared_shapes_builds_on_every_target(name, target, tmp_path):
    path = save(_with_stale_shapes(REPO / "models" / f"{name}.onnx"), tmp_path, name)
    said = "output 'logits' is declared 1x? but computes 8x1x11; 1 intermediate"
    with pytest.warns(EdgecWarning, match=re.escape(said)):
        result = build(path, target, tmp_path / "out", BuildOptions(precision="fp32"))
    assert result.verification.passed and result.verification.outputs[0].shape == [8, 1, 11]
    assert any(said in note for note in json.loads(result.report_path.read_text())["notes"])


def test_bidirectional_crnn_builds_int8_tflite(tmp_path):
    """The LSTM cells' matmuls and gates are int8 inside XNNPACK; only the sequence's
    (un)stacking and reversal, which XNNPACK does not run, stay float."""
    options = BuildOptions(precision="int8", inputs=EVAL, max_samples=16, calib_samples=32, bias_correction=False)
    with pytest.warns(EdgecWarning, match="Calibrating with random inputs"):
        result = build(REPO / "models" / "crnn_bilstm.onnx", "tflite-arm", tmp_path / "out", options)
    assert result.verification.passed and result.verification.outputs[0].cosine >= 0.98
    lowering = result.report["lowering"]
    assert not {"FULLY_CONNECTED", "LOGISTIC", "TANH", "MUL", "ADD"} & set(lowering["float_ops"]), lowering["float_ops"]


def test_recurrent_macs_are_counted():
    g = GraphBuilder()
    y = recurrent(g, "GRU", "x", dirs=2, direction="bidirectional")
    model = ir.serde.deserialize_model(g.model({"x": x_shape()}, {y: None}))
    row = next(r for r in layer_table(model.graph) if r["op"] == "GRU")
    assert row["macs"] == SEQ * BATCH * 2 * 3 * HIDDEN * (FEATURES + HIDDEN)


def test_channel_pruning_leaves_the_lstm_alone(tmp_path):
    """The LSTM has no channel rule: whatever feeds it keeps its channels, its weights stay."""
    path = REPO / "models" / "crnn_bilstm.onnx"
    options = BuildOptions(inputs=EVAL, max_samples=8, calib=str(REPO / "models" / "data" / "digits_calib_nchw.npz"),
                           recipe=[Step("prune", {"mac_reduction": 0.2})])
    result = build(path, "ort-x86", tmp_path / "out", options)
    assert result.verification.passed and result.report["compression"]["mac_reduction"] >= 0.2
    source, pruned = onnx.load(path), onnx.load(tmp_path / "out" / "crnn_bilstm.compressed.onnx")
    assert _lstm_weights(pruned) and all(np.array_equal(a, b) for a, b in zip(_lstm_weights(source), _lstm_weights(pruned)))


def _lstm_weights(proto) -> list[np.ndarray]:
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    weights = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return [weights[name] for name in lstm.input[1:4]]
