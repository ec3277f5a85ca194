"""Softmax family, LayerNormalization, InstanceNormalization and reductions."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.graph import normalize_axes
from edgec.lower.tflite.registry import rule
from edgec.passes.layout import CL_DOMAIN


@rule("Softmax")
def softmax(ctx, x, *, axis=-1):
    return keras.layers.Softmax(axis=axis, name=ctx.name())(x)


@rule("LogSoftmax")
def log_softmax(ctx, x, *, axis=-1):
    return tf.nn.log_softmax(x, axis=axis)


@rule("RMSNormalization")
def rms_normalization(ctx, x, scale, *, axis=-1, epsilon=1e-5, stash_type=1):
    """x / sqrt(mean(x²) + epsilon) · scale over the axes from ``axis`` on (opset 23; LLaMA's norm)."""
    rank = len(ctx.in_shape(0))
    axes = list(range(normalize_axes([axis], rank)[0], rank))
    scale = scale.astype(x.dtype.as_numpy_dtype) if isinstance(scale, np.ndarray) else scale
    return x * tf.math.rsqrt(tf.math.reduce_mean(tf.math.square(x), axis=axes, keepdims=True) + epsilon) * scale


@rule("LayerNormalization")
def layer_normalization(ctx, x, scale, bias=None, *, axis=-1, epsilon=1e-5, stash_type=1):
    rank = len(ctx.in_shape(0))
    axes = list(range(normalize_axes([axis], rank)[0], rank))
    gamma = ctx.require_constant(scale, "scale")
    beta = np.zeros_like(gamma) if bias is None else ctx.require_constant(bias, "bias")
    normalized_shape = ctx.in_shape(0)[axes[0]:]
    layer = keras.layers.LayerNormalization(axis=axes, epsilon=epsilon, name=ctx.name())
    y = layer(x)
    layer.set_weights([np.broadcast_to(gamma, normalized_shape).astype(np.float32),
                       np.broadcast_to(beta, normalized_shape).astype(np.float32)])
    return y


@rule("InstanceNormalization")
def instance_normalization(ctx, x, scale, bias, *, epsilon=1e-5):
    """Each channel of each sample normalized over its spatial axes, in the ONNX layout
    (channels at axis 1). PyTorch's GroupNorm exports as this between two Reshapes."""
    rank = len(ctx.in_shape(0))
    per_channel = (-1,) + (1,) * (rank - 2)
    gamma = ctx.require_constant(scale, "scale").reshape(per_channel)
    beta = ctx.require_constant(bias, "bias").reshape(per_channel)
    return _normalized(x, list(range(2, rank)), epsilon) * gamma.astype(x.dtype.as_numpy_dtype) + beta.astype(x.dtype.as_numpy_dtype)


@rule("LRN", domain=CL_DOMAIN)
def local_response_norm(ctx, x, *, size, alpha=1e-4, beta=0.75, bias=1.0):
    """AlexNet's and GoogLeNet's LRN across channels, TFLite's LOCAL_RESPONSE_NORMALIZATION:
    ONNX divides alpha by the window's size, TF does not. An even window is off-centre in
    ONNX and centred in TF."""
    if size % 2 == 0:
        ctx.unsupported(f"an even window (size {size}), which TFLite cannot place as ONNX does")
    return tf.nn.local_response_normalization(x, depth_radius=(size - 1) // 2, bias=bias, alpha=alpha / size, beta=beta)


@rule("GroupNorm", domain=CL_DOMAIN)
def group_norm(ctx, x, scale, bias, *, num_groups, epsilon=1e-5):
    """edgec's fused GroupNorm on channels-last data [N, *S, C]: the channels split into
    [G, C/G] on the last axes, each group normalized over its pixels and its channels."""
    shape = ctx.in_shape(0)
    grouped = tf.reshape(x, [*shape[:-1], num_groups, shape[-1] // num_groups])
    normed = tf.reshape(_normalized(grouped, [*range(1, len(shape) - 1), len(shape)], epsilon), shape)
    dtype = x.dtype.as_numpy_dtype
    return normed * ctx.require_constant(scale, "scale").astype(dtype) + ctx.require_constant(bias, "bias").astype(dtype)


def _normalized(x, axes, epsilon):
    """(x − mean) / sqrt(variance + epsilon) over ``axes``."""
    centred = x - tf.math.reduce_mean(x, axis=axes, keepdims=True)
    variance = tf.math.reduce_mean(tf.math.square(centred), axis=axes, keepdims=True)
    return centred * tf.math.rsqrt(variance + epsilon)


def _axes(ctx, axes_input, axes_attr, rank):
    axes = axes_attr if axes_input is None else ctx.require_constant(axes_input, "axes").tolist()
    return normalize_axes(axes, rank) if axes else None


_REDUCERS = {
    "ReduceMean": tf.math.reduce_mean,
    "ReduceSum": tf.math.reduce_sum,
    "ReduceMax": tf.math.reduce_max,
    "ReduceMin": tf.math.reduce_min,
    "ReduceProd": tf.math.reduce_prod,
    "ReduceSumSquare": lambda x, axis, keepdims: tf.math.reduce_sum(tf.math.square(x), axis=axis, keepdims=keepdims),
    "ReduceL2": lambda x, axis, keepdims: tf.math.sqrt(
        tf.math.reduce_sum(tf.math.square(x), axis=axis, keepdims=keepdims)),
    "ReduceL1": lambda x, axis, keepdims: tf.math.reduce_sum(tf.math.abs(x), axis=axis, keepdims=keepdims),
    "ReduceLogSum": lambda x, axis, keepdims: tf.math.log(tf.math.reduce_sum(x, axis=axis, keepdims=keepdims)),
    "ReduceLogSumExp": lambda x, axis, keepdims: _log_sum_exp(x, axis, keepdims),
}


def _log_sum_exp(x, axis, keepdims):
    """log Σ exp(x), shifted by the largest x so exp cannot overflow (TFLite has no kernel for it)."""
    top = tf.stop_gradient(tf.math.reduce_max(x, axis=axis, keepdims=True))
    total = tf.math.log(tf.math.reduce_sum(tf.math.exp(x - top), axis=axis, keepdims=True)) + top
    return total if keepdims else tf.squeeze(total, axis=axis)


def _reduce_rule(op_type: str, fn):
    @rule(op_type)
    def lower(ctx, x, axes_input=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        chosen = _axes(ctx, axes_input, axes, len(ctx.in_shape(0)))
        if chosen is None and noop_with_empty_axes:
            return x
        return fn(x, axis=chosen, keepdims=bool(keepdims))

    lower.__name__ = op_type.lower()
    return lower


for _op, _fn in _REDUCERS.items():
    _reduce_rule(_op, _fn)


def _arg_rule(op_type: str, fn):
    @rule(op_type)
    def lower(ctx, x, *, axis=0, keepdims=1, select_last_index=0):
        axis = normalize_axes([axis], len(ctx.in_shape(0)))[0]
        if select_last_index:  # the first of the reversed axis, counted from the end
            y = (ctx.in_shape(0)[axis] - 1) - fn(tf.reverse(x, [axis]), axis=axis, output_type=tf.int64)
        else:
            y = fn(x, axis=axis, output_type=tf.int64)
        return tf.expand_dims(y, axis) if keepdims else y

    lower.__name__ = op_type.lower()
    return lower


_arg_rule("ArgMax", tf.math.argmax)
_arg_rule("ArgMin", tf.math.argmin)
