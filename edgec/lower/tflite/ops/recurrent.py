"""LSTM and GRU → Keras ``RNN`` layers over ``LSTMCell``/``GRUCell``, one per direction.

Not the Keras ``LSTM`` layer: the converter fuses that into UNIDIRECTIONAL_SEQUENCE_LSTM,
whose states are variable tensors the kernel leaves its final states in, so each inference
starts where the last one ended unless the app resets them (measured: the second run of
the same input differed by 0.28) — an artifact that is right only once. The cells become
plain ops instead, stateless: unrolled into per-step FULLY_CONNECTED and elementwise ops
(XNNPACK runs those in float and in int8), or for sequences longer than
``MAX_UNROLLED_STEPS`` a WHILE loop over the same ops — except for int8, whose calibration
crashes the converter on a WHILE loop (a segfault in TF 2.19), so int8 always unrolls.
Measured on this host, 64 units: 32 steps unrolled 0.08 ms, fused 0.11 ms, loop 0.17 ms;
128 steps 0.42-0.48 ms all three.

ONNX stacks gates as LSTM [i, o, f, c] and GRU [z, r, h]; Keras as LSTM [i, f, c, o] and
GRU [z, r, h]. Reverse directions run on the time-reversed sequence and flip their output
back, so every direction's ``Y`` is in source time order as ONNX defines it.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.context import is_tensor
from edgec.lower.tflite.registry import rule

# Longer sequences become a WHILE loop where loops are allowed: unrolling adds ~14 ops per
# step and direction, and conversion time grows with them (~0.2 s per step here).
MAX_UNROLLED_STEPS = 64
_LSTM_GATES = [0, 2, 3, 1]  # ONNX [i, o, f, c] → Keras [i, f, c, o]
_DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}


@rule("LSTM")
def lstm(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *, activation_alpha=None,
         activation_beta=None, activations=None, clip=None, direction="forward", hidden_size=None, input_forget=0, layout=0):
    _check_common(ctx, sequence_lens, activation_alpha, activation_beta, activations, clip, direction, layout)
    if input_forget:
        ctx.unsupported("input_forget=1 (coupled input and forget gates), which Keras LSTM does not have")
    if p is not None and np.any(ctx.require_constant(p, "peephole weights")):
        ctx.unsupported("non-zero peephole weights (P), which Keras LSTM does not have")
    w, r = ctx.require_constant(w, "input weights (W)"), ctx.require_constant(r, "recurrence weights (R)")
    units = r.shape[-1]
    keep_c = _used(ctx, 2)
    ys, cs = [], []
    for d in range(w.shape[0]):
        kernel = _gates(w[d], _LSTM_GATES, units).T
        recurrent = _gates(r[d], _LSTM_GATES, units).T
        bias = _lstm_bias(b, d, units)
        layer = _rnn(ctx, keras.layers.LSTMCell(units), direction, d, layout, return_state=keep_c)
        states = _initial_states(x, [initial_h, initial_c], d, layout, units)
        out = layer(x, initial_state=states)
        layer.set_weights([kernel, recurrent, bias])
        y, c = (out[0], out[2]) if keep_c else (out, None)
        ys.append(y)
        cs.append(c)
    return _onnx_outputs(ctx, direction, layout, ys, cs)


@rule("GRU")
def gru(ctx, x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction="forward", hidden_size=None, layout=0, linear_before_reset=0):
    _check_common(ctx, sequence_lens, activation_alpha, activation_beta, activations, clip, direction, layout)
    w, r = ctx.require_constant(w, "input weights (W)"), ctx.require_constant(r, "recurrence weights (R)")
    units = r.shape[-1]
    ys = []
    for d in range(w.shape[0]):
        layer = _rnn(ctx, keras.layers.GRUCell(units, reset_after=bool(linear_before_reset)), direction, d, layout)
        y = layer(x, initial_state=_initial_states(x, [initial_h], d, layout, units))
        layer.set_weights([w[d].T, r[d].T, _gru_bias(b, d, units, bool(linear_before_reset))])
        ys.append(y)
    return _onnx_outputs(ctx, direction, layout, ys, [])


def _check_common(ctx, sequence_lens, activation_alpha, activation_beta, activations, clip, direction, layout) -> None:
    """Refuse what Keras recurrent layers cannot express, naming the attribute or input."""
    op = ctx.node.op_type
    if direction not in ("forward", "reverse", "bidirectional"):
        ctx.unsupported(f"direction '{direction}'")
    if layout not in (0, 1):
        ctx.unsupported(f"layout {layout}")
    if clip is not None:
        ctx.unsupported(f"clip={clip} (cell clipping), which Keras {op} does not have")
    if activation_alpha is not None or activation_beta is not None:
        ctx.unsupported("activation_alpha/activation_beta (parameterized activations)")
    defaults = _DEFAULT_ACTIVATIONS[op] * (2 if direction == "bidirectional" else 1)
    if activations is not None and [a.lower() for a in activations] != defaults:
        ctx.unsupported(f"activations {activations}; only the defaults {_DEFAULT_ACTIVATIONS[op]} map to Keras {op}")
    if sequence_lens is not None:
        lens = ctx.require_constant(sequence_lens, "sequence_lens")
        steps = ctx.in_shape(0)[layout == 1]
        if np.any(lens != steps):
            ctx.unsupported(f"sequence_lens {lens.tolist()} shorter than the {steps} time steps (padded sequences)")


def _rnn(ctx, cell, direction: str, d: int, layout: int, return_state: bool = False) -> keras.layers.RNN:
    steps = ctx.in_shape(0)[layout == 1]
    return keras.layers.RNN(cell, return_sequences=True, return_state=return_state, go_backwards=_backward(direction, d),
                            unroll=steps <= MAX_UNROLLED_STEPS or not ctx.loops, time_major=layout == 0, name=ctx.name(f"_{d}"))


def _used(ctx, index: int) -> bool:
    outputs = ctx.node.outputs
    return index < len(outputs) and bool(outputs[index].uses() or outputs[index].is_graph_output())


def _backward(direction: str, d: int) -> bool:
    return direction == "reverse" or (direction == "bidirectional" and d == 1)


def _gates(weight: np.ndarray, order: list[int], units: int) -> np.ndarray:
    """Reorder a [gates·units, n] ONNX weight's gate blocks."""
    return weight.reshape(len(order), units, -1)[order].reshape(len(order) * units, -1).astype(np.float32)


def _lstm_bias(b: np.ndarray | None, d: int, units: int) -> np.ndarray:
    """Keras LSTM has one bias: the sum of ONNX's input (Wb) and recurrence (Rb) biases."""
    if b is None:
        return np.zeros(4 * units, np.float32)
    summed = b[d, : 4 * units] + b[d, 4 * units:]
    return _gates(summed.reshape(-1, 1), _LSTM_GATES, units).reshape(-1)


def _gru_bias(b: np.ndarray | None, d: int, units: int, reset_after: bool) -> np.ndarray:
    """reset_after (linear_before_reset=1) keeps input and recurrence biases apart, as ONNX
    does: the recurrence's candidate bias is scaled by the reset gate. Otherwise both only
    ever appear summed."""
    pair = np.zeros((2, 3 * units), np.float32) if b is None else b[d].reshape(2, 3 * units).astype(np.float32)
    return pair if reset_after else pair.sum(axis=0)


def _initial_states(x, states: list, d: int, layout: int, units: int) -> list | None:
    """Direction ``d``'s initial states as Keras wants them ([batch, units] each), or None
    when all are zeros (Keras's own default).

    Keras takes either all or none of a layer's inputs as Keras tensors, so constant states
    are added to zeros computed from ``x``.
    """
    if all(s is None or (isinstance(s, np.ndarray) and not np.any(s)) for s in states):
        return None
    zeros = tf.zeros_like(x[0, :, :1] if layout == 0 else x[:, 0, :1])  # [batch, 1]
    picked = []
    for s in states:
        if is_tensor(s):
            picked.append(s[d] if layout == 0 else s[:, d])
        else:
            value = np.zeros((1, units)) if s is None else (s[d] if layout == 0 else s[:, d])
            picked.append(zeros + value.astype(np.float32))
    return picked


def _onnx_outputs(ctx, direction: str, layout: int, ys: list, cs: list) -> tuple:
    """Y [seq, dirs, batch, hidden] (layout 1: [batch, seq, dirs, hidden]), Y_h and Y_c
    [dirs, batch, hidden] (layout 1: [batch, dirs, hidden]) from per-direction Keras outputs
    in processing order."""
    y = y_h = None
    if _used(ctx, 0):
        in_order = [tf.reverse(y, [layout]) if _backward(direction, d) else y for d, y in enumerate(ys)]
        y = tf.stack(in_order, axis=1 if layout == 0 else 2)
    if _used(ctx, 1):
        y_h = tf.stack([y[-1] if layout == 0 else y[:, -1] for y in ys], axis=layout)
    y_c = tf.stack(cs, axis=layout) if _used(ctx, 2) else None
    return y, y_h, y_c
