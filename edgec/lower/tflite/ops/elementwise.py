"""Elementwise math with numpy-style broadcasting.

Two same-shaped tensors use Keras merge layers (Add, Multiply, ...); anything involving a
constant or broadcasting uses the TF op, which tf_keras records as a layer of its own.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.context import is_tensor, tf_dtype
from edgec.lower.tflite.registry import rule


def _binary(ctx, a, b, layer_cls, tf_fn):
    if layer_cls is not None and is_tensor(a) and is_tensor(b) and tuple(a.shape) == tuple(b.shape):
        return layer_cls(name=ctx.name())([a, b])
    return tf_fn(a, b)


def _const_as(value, like):
    """Constants take the tensor's dtype (ONNX and TF agree on types; numpy scalars may not)."""
    if isinstance(value, np.ndarray) and is_tensor(like):
        return value.astype(like.dtype.as_numpy_dtype)
    return value


def _broadcast_rule(op_type: str, layer_cls, tf_fn):
    @rule(op_type)
    def lower(ctx, a, b):
        return _binary(ctx, _const_as(a, b), _const_as(b, a), layer_cls, tf_fn)

    lower.__name__ = op_type.lower()
    return lower


_broadcast_rule("Add", keras.layers.Add, tf.math.add)
_broadcast_rule("Sub", keras.layers.Subtract, tf.math.subtract)
_broadcast_rule("Mul", keras.layers.Multiply, tf.math.multiply)
_broadcast_rule("And", None, tf.math.logical_and)
_broadcast_rule("Or", None, tf.math.logical_or)
_broadcast_rule("Xor", None, tf.math.not_equal)  # of booleans

# TFLite's DIV and comparisons have no kernels for these (the converter refuses int8 EQUAL,
# and LiteRT aborts the process running a uint8 one): they compute in int32, exactly.
_NARROW_INTEGERS = (tf.int8, tf.uint8, tf.int16, tf.uint16)


def _widened(x):
    """A narrow-integer tensor or constant as int32; anything else as it is."""
    if is_tensor(x):
        return tf.cast(x, tf.int32) if x.dtype in _NARROW_INTEGERS else x
    narrow = isinstance(x, np.ndarray) and tf.as_dtype(x.dtype) in _NARROW_INTEGERS
    return x.astype(np.int32) if narrow else x


def _in_int32(tf_fn):
    return lambda a, b: tf_fn(_widened(a), _widened(b))


_broadcast_rule("Equal", None, _in_int32(tf.math.equal))
_broadcast_rule("Less", None, _in_int32(tf.math.less))
_broadcast_rule("LessOrEqual", None, _in_int32(tf.math.less_equal))
_broadcast_rule("Greater", None, _in_int32(tf.math.greater))
_broadcast_rule("GreaterOrEqual", None, _in_int32(tf.math.greater_equal))


@rule("Div")
def div(ctx, a, b):
    """Integer Div truncates toward zero; ``tf.math.divide`` would divide in float instead."""
    a, b = _const_as(a, b), _const_as(b, a)
    dtype = ctx.out_dtype(0)
    if not dtype.is_integer:
        return tf.math.divide(a, b)
    if dtype in _NARROW_INTEGERS:
        return tf.cast(tf.truncatediv(_widened(a), _widened(b)), dtype)
    return tf.truncatediv(a, b)


@rule("Mod")
def mod(ctx, a, b, *, fmod=0):
    """``fmod=0``: the remainder takes the divisor's sign (FLOOR_MOD); ``fmod=1``: the
    dividend's, as C's fmod, ``a − b·trunc(a / b)``."""
    a, b = _widened(_const_as(a, b)), _widened(_const_as(b, a))
    dtype = ctx.out_dtype(0)
    if not fmod:
        remainder = tf.math.floormod(a, b)
    elif dtype.is_integer:
        remainder = a - b * tf.truncatediv(a, b)
    else:
        quotient = a / b
        remainder = a - b * (tf.math.sign(quotient) * tf.math.floor(tf.math.abs(quotient)))
    return tf.cast(remainder, dtype) if dtype in _NARROW_INTEGERS else remainder


def _variadic_rule(op_type: str, layer_cls, tf_fn):
    @rule(op_type)
    def lower(ctx, *inputs):
        return functools.reduce(lambda a, b: _binary(ctx, _const_as(a, b), _const_as(b, a), layer_cls, tf_fn), inputs)

    lower.__name__ = op_type.lower()
    return lower


_variadic_rule("Max", keras.layers.Maximum, tf.math.maximum)
_variadic_rule("Min", keras.layers.Minimum, tf.math.minimum)
_variadic_rule("Sum", keras.layers.Add, tf.math.add)


@rule("Mean")
def mean(ctx, *inputs):
    total = functools.reduce(lambda a, b: _binary(ctx, a, b, keras.layers.Add, tf.math.add), inputs)
    return total * (1.0 / len(inputs))


@rule("Pow")
def pow_(ctx, base, exponent):
    if isinstance(exponent, np.ndarray) and exponent.size == 1:
        e = float(exponent.reshape(-1)[0])
        if e == 2.0:
            return tf.math.square(base)
        if e == 0.5:
            return tf.math.sqrt(base)
        if e == 1.0:
            return base
    return tf.math.pow(base, _const_as(exponent, base))


def _unary_rule(op_type: str, tf_fn):
    @rule(op_type)
    def lower(ctx, x):
        return tf_fn(x)

    lower.__name__ = op_type.lower()
    return lower


for _op, _fn in {
    "Sqrt": tf.math.sqrt, "Exp": tf.math.exp, "Log": tf.math.log, "Abs": tf.math.abs, "Neg": tf.math.negative,
    "Floor": tf.math.floor, "Ceil": tf.math.ceil, "Sin": tf.math.sin, "Cos": tf.math.cos, "Sign": tf.math.sign,
    "Not": tf.math.logical_not, "Round": tf.math.round,
}.items():
    _unary_rule(_op, _fn)


# TFLite has SIN, COS, EXP, LOG, SQRT and ATAN2 kernels; the rest of ONNX's trigonometry is
# written with them.
def _root_one_minus_square(x):
    return tf.math.sqrt(1.0 - tf.math.square(x))


for _op, _fn in {
    "Tan": lambda x: tf.math.sin(x) / tf.math.cos(x),
    "Atan": lambda x: tf.math.atan2(x, tf.ones_like(x)),
    "Asin": lambda x: tf.math.atan2(x, _root_one_minus_square(x)),
    "Acos": lambda x: tf.math.atan2(_root_one_minus_square(x), x),
    "Sinh": lambda x: (tf.math.exp(x) - tf.math.exp(-x)) * 0.5,
    "Cosh": lambda x: (tf.math.exp(x) + tf.math.exp(-x)) * 0.5,
    "Asinh": lambda x: tf.math.sign(x) * tf.math.log(tf.math.abs(x) + tf.math.sqrt(tf.math.square(x) + 1.0)),
    "Acosh": lambda x: tf.math.log(x + tf.math.sqrt(tf.math.square(x) - 1.0)),
    "Atanh": lambda x: 0.5 * tf.math.log((1.0 + x) / (1.0 - x)),
}.items():
    _unary_rule(_op, _fn)


@rule("IsNaN")
def is_nan(ctx, x):
    """NaN is the one value unequal to itself: TFLite has no IS_NAN kernel but has NOT_EQUAL.
    (Attention exporters guard softmax rows that were fully masked this way.)"""
    return tf.math.not_equal(x, x)


@rule("Reciprocal")
def reciprocal(ctx, x):
    return 1.0 / x


@rule("Where")
def where(ctx, condition, a, b):
    return tf.where(condition, _const_as(a, b), _const_as(b, a))


@rule("Cast")
def cast(ctx, x, *, saturate=1, to):
    return tf.cast(x, tf_dtype(ir.DataType(to)))


@rule("CastLike")
def cast_like(ctx, x, like, *, saturate=1):
    return tf.cast(x, ctx.out_dtype(0))


@rule("Identity")
def identity(ctx, x):
    return x


@rule("Dropout")
def dropout(ctx, x, ratio=None, training_mode=None, *, seed=None):
    """Inference: the input as it is, and a mask that keeps everything. (onnxsim removes the
    Dropouts it can; one that is a graph output stays.)"""
    if training_mode is not None and not (isinstance(training_mode, np.ndarray) and not training_mode.any()):
        ctx.unsupported("training mode (random dropping)")
    return (x, tf.ones_like(x, dtype=tf.bool))[:len(ctx.node.outputs)]
