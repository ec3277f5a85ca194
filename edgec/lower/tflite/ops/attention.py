"""ONNX's Attention op (opset 23) as the matmuls, masks and softmax it stands for; and its
RotaryEmbedding (position embedding of the same transformer blocks).

Follows the spec's reference: 3-D inputs split into heads, the key/value cache concatenated
in front, K and V heads repeated for grouped-query attention, Q and K each scaled by the
square root of the scale, then bias (mask, causal), softcap, softmax, and the product with V.
Masks and the causal triangle are additive biases of -inf; a constant mask is one constant.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from edgec.lower.tflite.registry import rule


@rule("Attention")
def attention(ctx, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *, is_causal=0,
              kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None, softcap=0.0, softmax_precision=None):
    if nonpad_kv_seqlen is not None:
        ctx.unsupported("nonpad_kv_seqlen")
    three_d = len(ctx.in_shape(0)) == 3
    if three_d:
        q, k, v = (_heads(x, ctx.in_shape(i), heads) for i, (x, heads) in enumerate(((q, q_num_heads), (k, kv_num_heads), (v, kv_num_heads))))
    present_key = k if past_key is None else tf.concat([past_key, k], axis=2)
    present_value = v if past_value is None else tf.concat([past_value, v], axis=2)
    q_heads, kv_heads = int(q.shape[1]), int(present_key.shape[1])
    keys, values = (_repeated(x, q_heads // kv_heads) for x in (present_key, present_value))
    root = float(np.sqrt(scale if scale is not None else 1.0 / np.sqrt(int(q.shape[3]))))
    scores = tf.linalg.matmul(q * root, keys * root, transpose_b=True)
    past = 0 if past_key is None else ctx.in_shape(4)[2]
    bias = _bias(attn_mask, bool(is_causal), int(q.shape[2]), int(keys.shape[2]), past, scores.dtype)
    biased = scores if bias is None else scores + bias
    capped = softcap * tf.math.tanh(biased / softcap) if softcap > 0 else biased
    weights = tf.nn.softmax(capped, axis=-1)
    y = tf.linalg.matmul(weights, values)
    if three_d:
        y = tf.reshape(tf.transpose(y, (0, 2, 1, 3)), ctx.out_shape(0))
    # Mode 2 is after the softcap only where there is one (else mode 0's), as in ONNX's reference.
    recorded = {0: scores, 1: biased, 2: capped if softcap > 0 else scores, 3: weights}.get(qk_matmul_output_mode)
    if recorded is None:
        ctx.unsupported(f"qk_matmul_output_mode {qk_matmul_output_mode}")
    return (y, present_key, present_value, recorded)[:len(ctx.node.outputs)]


def _heads(x, shape, heads):
    """[B, S, heads·D] → [B, heads, S, D]."""
    batch, length, hidden = shape
    return tf.transpose(tf.reshape(x, (batch, length, heads, hidden // heads)), (0, 2, 1, 3))


def _repeated(x, times: int):
    """Each head ``times`` times in a row (h0, h0, h1, h1, ...): grouped-query attention."""
    if times == 1:
        return x
    batch, heads, length, size = (int(d) for d in x.shape)
    tiled = tf.tile(tf.expand_dims(x, 2), (1, 1, times, 1, 1))
    return tf.reshape(tiled, (batch, heads * times, length, size))


def _bias(mask, causal: bool, q_length: int, kv_length: int, past: int, dtype):
    """The additive bias of a mask (a boolean mask: -inf where False; either padded to the keys'
    length with -inf) and of the causal triangle (-inf right of the diagonal, after the cache)."""
    triangle = None
    if causal:
        triangle = np.zeros((q_length, kv_length), np.float32)
        triangle[:, past:][np.triu(np.ones((q_length, kv_length - past), bool), k=1)] = -np.inf
    if mask is None:
        return triangle
    if isinstance(mask, np.ndarray):
        additive = np.where(mask, 0.0, -np.inf).astype(np.float32) if mask.dtype == bool else mask.astype(np.float32)
    else:
        additive = tf.where(mask, 0.0, -np.inf) if mask.dtype == tf.bool else tf.cast(mask, dtype)
    short = kv_length - int(additive.shape[-1])
    if short > 0:
        padding = np.full((*additive.shape[:-1], short), -np.inf, np.float32)
        additive = np.concatenate([additive, padding], -1) if isinstance(additive, np.ndarray) else tf.concat([additive, padding], -1)
    return additive if triangle is None else additive + triangle


@rule("RotaryEmbedding")
def rotary_embedding(ctx, x, cos_cache, sin_cache, position_ids=None, *, interleaved=0, num_heads=0, rotary_embedding_dim=0):
    """Rotary position embedding (opset 23): the first ``rotary_embedding_dim`` features of each
    head rotated pairwise (halves, or even/odd pairs when ``interleaved``) by the cached angles."""
    shape = ctx.in_shape(0)
    if len(shape) == 4:
        heads = tf.transpose(x, (0, 2, 1, 3))  # [B, S, H, D]
    else:
        if not num_heads:
            ctx.unsupported("3-D input without num_heads")
        heads = tf.reshape(x, (shape[0], shape[1], num_heads, shape[2] // num_heads))
    size = int(heads.shape[3])
    rotated_size = rotary_embedding_dim or size
    cos, sin = (_at_positions(cache, position_ids) for cache in (cos_cache, sin_cache))
    cos, sin = tf.expand_dims(cos, 2), tf.expand_dims(sin, 2)
    part = heads[..., :rotated_size]
    first, second = (part[..., 0::2], part[..., 1::2]) if interleaved else tf.split(part, 2, axis=-1)
    real, imaginary = cos * first - sin * second, sin * first + cos * second
    if interleaved:
        turned = tf.reshape(tf.stack([real, imaginary], axis=-1), part.shape)
    else:
        turned = tf.concat([real, imaginary], axis=-1)
    if rotated_size < size:
        turned = tf.concat([turned, heads[..., rotated_size:]], axis=-1)
    return tf.reshape(turned, shape) if len(shape) == 3 else tf.transpose(turned, (0, 2, 1, 3))


def _at_positions(cache, position_ids):
    """The cache's rows at ``position_ids`` ([B, S, D/2]); without ids, the cache is already per position."""
    if position_ids is None:
        return cache
    if isinstance(position_ids, np.ndarray) and isinstance(cache, np.ndarray):
        return cache[position_ids]
    return tf.gather(cache, position_ids if not isinstance(position_ids, np.ndarray) else position_ids.astype(np.int32))
