"""Activations → Keras activation layers, or the TF expressions the converter fuses
(``x * relu6(x + 3) / 6`` becomes one HARD_SWISH op, ``relu6(...)`` a fused activation)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.registry import rule
from edgec.passes.fuse import FUSED_DOMAIN


@rule("Relu")
def relu(ctx, x):
    return keras.layers.ReLU(name=ctx.name())(x)


@rule("Clip")
def clip(ctx, x, low=None, high=None):
    low = -np.inf if low is None else float(ctx.require_constant(low, "minimum"))
    high = np.inf if high is None else float(ctx.require_constant(high, "maximum"))
    if low == 0.0:
        return keras.layers.ReLU(max_value=None if np.isinf(high) else high, name=ctx.name())(x)
    return tf.clip_by_value(x, low, high)


@rule("LeakyRelu")
def leaky_relu(ctx, x, *, alpha=0.01):
    return keras.layers.LeakyReLU(alpha=alpha, name=ctx.name())(x)


@rule("PRelu")
def prelu(ctx, x, slope):
    slope = ctx.require_constant(slope, "slope")
    shape = ctx.in_shape(0)
    # Keras keeps alpha per non-batch axis, 1 on axes it shares: the slope broadcast that way.
    alpha = slope.reshape((1,) * (len(shape) - slope.ndim) + slope.shape)[0]
    shared = [axis + 1 for axis, d in enumerate(alpha.shape) if d == 1 and shape[axis + 1] != 1] or None
    layer = keras.layers.PReLU(shared_axes=shared, name=ctx.name())
    y = layer(x)
    layer.set_weights([np.ascontiguousarray(alpha, dtype=np.float32)])
    return y


@rule("Sigmoid")
def sigmoid(ctx, x):
    return keras.layers.Activation("sigmoid", name=ctx.name())(x)


@rule("Tanh")
def tanh(ctx, x):
    return keras.layers.Activation("tanh", name=ctx.name())(x)


@rule("Elu")
def elu(ctx, x, *, alpha=1.0):
    return keras.layers.ELU(alpha=alpha, name=ctx.name())(x)


@rule("Softplus")
def softplus(ctx, x):
    return keras.layers.Activation("softplus", name=ctx.name())(x)


@rule("Mish")
def mish(ctx, x):
    return x * tf.math.tanh(tf.math.softplus(x))


@rule("Selu")
def selu(ctx, x, *, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return gamma * (tf.nn.relu(x) + alpha * (tf.math.exp(tf.math.minimum(x, 0.0)) - 1.0))


@rule("Celu")
def celu(ctx, x, *, alpha=1.0):
    return tf.nn.relu(x) + tf.math.minimum(alpha * (tf.math.exp(x / alpha) - 1.0), 0.0)


@rule("ThresholdedRelu")
def thresholded_relu(ctx, x, *, alpha=1.0):
    return tf.where(x > alpha, x, tf.zeros_like(x))


@rule("Shrink")
def shrink(ctx, x, *, bias=0.0, lambd=0.5):
    zero = tf.zeros_like(x)
    return tf.where(x > lambd, x - tf.cast(bias, x.dtype), tf.where(x < -lambd, x + tf.cast(bias, x.dtype), zero))


@rule("Softsign")
def softsign(ctx, x):
    return x / (1.0 + tf.math.abs(x))


@rule("Hardmax")
def hardmax(ctx, x, *, axis=-1):
    """1 at the first largest value along ``axis``, 0 elsewhere."""
    axis = axis % len(ctx.in_shape(0))
    return tf.one_hot(tf.math.argmax(x, axis=axis), ctx.in_shape(0)[axis], axis=axis, dtype=x.dtype)


@rule("HardSigmoid")
def hard_sigmoid(ctx, x, *, alpha=0.2, beta=0.5):
    # clip(a*x + b, 0, 1) = relu6(6a*x + 6b) / 6: the converter fuses the relu6 into the add.
    return tf.nn.relu6(x * (6.0 * alpha) + 6.0 * beta) * (1.0 / 6.0)


@rule("HardSwish")
def hard_swish(ctx, x):
    return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)


@rule("Gelu")
def gelu(ctx, x, *, approximate="none"):
    return tf.nn.gelu(x, approximate=approximate == "tanh")


rule("Gelu", domain=FUSED_DOMAIN)(gelu)


# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): TFLite has no ERF kernel.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@rule("Erf")
def erf(ctx, x):
    ax = tf.abs(x)
    t = 1.0 / (1.0 + _ERF_P * ax)
    poly = t * (_ERF_A[0] + t * (_ERF_A[1] + t * (_ERF_A[2] + t * (_ERF_A[3] + t * _ERF_A[4]))))
    return tf.sign(x) * (1.0 - poly * tf.exp(-ax * ax))
