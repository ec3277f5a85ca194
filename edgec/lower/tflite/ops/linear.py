"""Gemm and MatMul → Keras Dense where the weight is constant, batched matmul otherwise; Einsum."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.context import is_tensor
from edgec.lower.tflite.registry import rule


def _dense(ctx, x, kernel: np.ndarray, bias: np.ndarray | None):
    layer = keras.layers.Dense(kernel.shape[1], use_bias=bias is not None, name=ctx.name())
    y = layer(x)
    layer.set_weights([kernel.astype(np.float32)] + ([bias.astype(np.float32)] if bias is not None else []))
    return y


@rule("Gemm")
def gemm(ctx, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    if transA:
        a = tf.transpose(a)
    if not isinstance(b, np.ndarray):
        y = tf.linalg.matmul(a, b, transpose_b=bool(transB)) * alpha
        return y if c is None else y + c * beta
    kernel = (b.T if transB else b) * alpha
    units = kernel.shape[1]
    bias = None
    if isinstance(c, np.ndarray):
        full = np.broadcast_to(c * beta, ctx.out_shape(0))
        if np.all(full == full[:1]):  # one bias row shared by the batch: Dense's own bias
            bias, c = full[0].reshape(units), None
    y = _dense(ctx, a, kernel, bias)
    return y if c is None else y + (c * beta)


@rule("MatMul")
def matmul(ctx, a, b):
    if isinstance(b, np.ndarray) and b.ndim == 2 and is_tensor(a):
        return _dense(ctx, a, b, None)
    return tf.linalg.matmul(a, b)


@rule("Einsum")
def einsum(ctx, *inputs, equation):
    """TensorFlow's converter unfolds an einsum into the TFLite kernels it needs (BATCH_MATMUL,
    TRANSPOSE, RESHAPE); ONNX spells the same equations, with spaces allowed."""
    return tf.einsum(equation.replace(" ", ""), *inputs)
