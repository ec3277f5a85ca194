"""Shape and data movement: Reshape/Flatten/Squeeze/Unsqueeze, Transpose, Concat, Split,
Slice, Gather, GatherND, Pad, Expand, Tile, Shape. Every output shape is static (canonicalization
guarantees it), so reshapes use the inferred shape instead of re-deriving ONNX's rules."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.graph import normalize_axes
from edgec.lower.tflite.context import is_tensor
from edgec.lower.tflite.registry import rule


def _reshape_to_output(ctx, x):
    out = ctx.out_shape(0)
    if out and out[0] == ctx.in_shape(0)[0] and len(ctx.in_shape(0)) > 0:
        return keras.layers.Reshape(out[1:], name=ctx.name())(x)
    return tf.reshape(x, out)


@rule("Reshape")
def reshape(ctx, x, shape, *, allowzero=0):
    return _reshape_to_output(ctx, x)


@rule("Flatten")
def flatten(ctx, x, *, axis=1):
    return _reshape_to_output(ctx, x)


@rule("Squeeze")
def squeeze(ctx, x, axes=None):
    return _reshape_to_output(ctx, x)


@rule("Unsqueeze")
def unsqueeze(ctx, x, axes):
    return _reshape_to_output(ctx, x)


@rule("Transpose")
def transpose(ctx, x, *, perm=None):
    perm = list(perm) if perm is not None else list(reversed(range(len(ctx.in_shape(0)))))
    if perm[0] == 0:
        return keras.layers.Permute(perm[1:], name=ctx.name())(x)
    return tf.transpose(x, perm)


@rule("Concat")
def concat(ctx, *inputs, axis):
    if all(is_tensor(t) for t in inputs):
        return keras.layers.Concatenate(axis=axis, name=ctx.name())(list(inputs))
    dtype = next(t.dtype for t in inputs if is_tensor(t))
    return tf.concat([t if is_tensor(t) else t.astype(dtype.as_numpy_dtype) for t in inputs], axis=axis)


@rule("Split")
def split(ctx, x, split=None, *, axis=0, num_outputs=None):
    axis = normalize_axes([axis], len(ctx.in_shape(0)))[0]
    sizes = [ctx.out_shape(i)[axis] for i in range(len(ctx.node.outputs))]
    return tuple(tf.split(x, sizes, axis=axis))


@rule("Slice")
def slice_(ctx, x, starts, ends, axes=None, steps=None):
    shape = ctx.in_shape(0)
    starts, ends = ctx.require_constant(starts, "starts"), ctx.require_constant(ends, "ends")
    axes = range(len(starts)) if axes is None else ctx.require_constant(axes, "axes")
    steps = np.ones(len(starts), np.int64) if steps is None else ctx.require_constant(steps, "steps")
    begin, end, strides = [0] * len(shape), list(shape), [1] * len(shape)
    end_mask = 0
    for start, stop, axis, step in zip(starts, ends, normalize_axes(list(axes), len(shape)), steps):
        first, last, stride = slice(int(start), int(stop), int(step)).indices(shape[axis])
        begin[axis], end[axis], strides[axis] = first, last, stride
        if last < 0:  # ran past index 0 going backwards: only a mask can say "to the start"
            end_mask |= 1 << axis
    return tf.strided_slice(x, begin, end, strides, end_mask=end_mask)


@rule("Gather")
def gather(ctx, data, indices, *, axis=0):
    """ONNX counts negative indices from the end; TFLite's GATHER refuses them when it runs."""
    axis = normalize_axes([axis], len(ctx.in_shape(0)))[0]
    return tf.gather(data, _from_the_end(indices, ctx.in_shape(0)[axis]), axis=axis)


def _from_the_end(indices, sizes):
    """Negative indices counted from the end of their axis (``sizes``: one size, or one per
    entry of the indices' last axis), in the indices' own dtype: TFLite's kernels refuse them."""
    if isinstance(indices, np.ndarray):
        return np.where(indices < 0, indices + np.asarray(sizes, indices.dtype), indices)
    return tf.where(indices < 0, indices + tf.constant(sizes, indices.dtype), indices)


@rule("GatherND")
def gather_nd(ctx, data, indices, *, batch_dims=0):
    if isinstance(indices, np.ndarray):  # ONNX allows negative indices, TFLite does not
        indices = _from_the_end(indices, ctx.in_shape(0)[batch_dims:batch_dims + indices.shape[-1]])
    return tf.gather_nd(data, indices, batch_dims=batch_dims)


@rule("GatherElements")
def gather_elements(ctx, data, indices, *, axis=0):
    """``torch.gather``: out[i] = data[i with axis coordinate indices[i]], a GATHER_ND."""
    return tf.gather_nd(data, _element_coordinates(ctx, indices, axis))


def _element_coordinates(ctx, indices, axis: int):
    """Each index's full coordinates into the data (input 0): its own position, with the
    axis coordinate taken from ``indices`` (negative ones counted from the end); a constant
    for constant indices."""
    shape = ctx.in_shape(1)
    axis = normalize_axes([axis], len(shape))[0]
    size = ctx.in_shape(0)[axis]
    grid = np.indices(shape, dtype=np.int32)
    if isinstance(indices, np.ndarray):
        grid[axis] = _from_the_end(indices, size)
        return np.moveaxis(grid, 0, -1)
    index = _from_the_end(tf.cast(indices, tf.int32), size)
    return tf.stack([index if d == axis else grid[d] for d in range(len(shape))], axis=-1)


@rule("ScatterND")
def scatter_nd(ctx, data, indices, updates, *, reduction="none"):
    """``data`` with ``updates`` written at ``indices`` (a slice assignment ``x[..., :2] = y``
    exports as this): SCATTER_ND of the updates into zeros, SELECT_V2 where one landed."""
    if reduction != "none":
        ctx.unsupported(f"reduction '{reduction}'")
    sizes = ctx.in_shape(0)[:ctx.in_shape(1)[-1]]
    index = indices.astype(np.int32) if isinstance(indices, np.ndarray) else tf.cast(indices, tf.int32)
    return _scattered(ctx, data, _from_the_end(index, sizes), updates)


@rule("ScatterElements")
def scatter_elements(ctx, data, indices, updates, *, axis=0, reduction="none"):
    """``torch.scatter``: the update at position i goes to i with its axis coordinate from indices."""
    if reduction != "none":
        ctx.unsupported(f"reduction '{reduction}'")
    return _scattered(ctx, data, _element_coordinates(ctx, indices, axis), updates)


def _scattered(ctx, data, coordinates, updates):
    """``data`` where ``coordinates`` (non-negative, int32, last axis indexing data's first axes) got ``updates``."""
    shape = ctx.in_shape(0)
    updates = tf.cast(updates, ctx.out_dtype(0))
    placed = tf.scatter_nd(coordinates, updates, shape)
    if isinstance(coordinates, np.ndarray):
        hit = np.zeros(shape, bool)
        hit[tuple(coordinates.reshape(-1, coordinates.shape[-1]).T)] = True
    else:
        hit = tf.scatter_nd(coordinates, tf.ones_like(updates, tf.int32), shape) > 0
    return tf.where(hit, placed, data)


@rule("EyeLike")
def eye_like(ctx, x, *, dtype=None, k=0):
    """A constant: ones on diagonal ``k`` of a matrix shaped like ``x``."""
    rows, cols = ctx.out_shape(0)
    return np.eye(rows, cols, k, dtype=ctx.out_dtype(0).as_numpy_dtype)


@rule("ReverseSequence")
def reverse_sequence(ctx, x, lengths, *, batch_axis=1, time_axis=0):
    """Each batch entry's first ``lengths[b]`` steps reversed (tf2onnx writes bidirectional RNNs so)."""
    return tf.reverse_sequence(x, tf.cast(lengths, tf.int32), seq_axis=time_axis, batch_axis=batch_axis)


@rule("Trilu")
def trilu(ctx, x, k=None, *, upper=1):
    """The upper (or lower) triangle of the last two axes, from diagonal ``k``; zeros elsewhere."""
    rows, cols = ctx.in_shape(0)[-2:]
    diagonal = 0 if k is None else int(ctx.require_constant(k, "k").reshape(-1)[0])
    keep = (np.triu if upper else np.tril)(np.ones((rows, cols), bool), diagonal)
    return tf.where(keep, x, tf.zeros_like(x))


@rule("Pad")
def pad(ctx, x, pads, constant_value=None, axes=None, *, mode="constant"):
    rank = len(ctx.in_shape(0))
    pads = ctx.require_constant(pads, "pads").tolist()
    axes = list(range(rank)) if axes is None else normalize_axes(ctx.require_constant(axes, "axes").tolist(), rank)
    paddings = [[0, 0] for _ in range(rank)]
    for i, axis in enumerate(axes):
        paddings[axis] = [int(pads[i]), int(pads[i + len(axes)])]
    if any(p < 0 for pair in paddings for p in pair):
        ctx.unsupported("negative pads (cropping)")
    value = 0.0 if constant_value is None else float(ctx.require_constant(constant_value, "pad value").reshape(-1)[0])
    if mode == "constant":
        return _zero_pad_layer(ctx, x, paddings) if value == 0.0 else tf.pad(x, paddings, constant_values=value)
    if mode == "reflect":
        return tf.pad(x, paddings, mode="REFLECT")
    if mode == "edge" and all(p <= 1 for pair in paddings for p in pair):
        return tf.pad(x, paddings, mode="SYMMETRIC")  # mirroring one element repeats the edge
    ctx.unsupported(f"mode '{mode}' with these pads")


def _zero_pad_layer(ctx, x, paddings):
    """ZeroPadding1D/2D when only the spatial axes of a channels-last tensor are padded."""
    spatial = paddings[1:-1]
    layer = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D}.get(len(spatial))
    if layer is None or paddings[0] != [0, 0] or paddings[-1] != [0, 0]:
        return tf.pad(x, paddings)
    spec = tuple(tuple(p) for p in spatial) if len(spatial) > 1 else tuple(spatial[0])
    return layer(spec, name=ctx.name())(x)


@rule("Expand")
def expand(ctx, x, shape):
    return tf.broadcast_to(x, ctx.out_shape(0))


@rule("Tile")
def tile(ctx, x, repeats):
    return tf.tile(x, ctx.require_constant(repeats, "repeats").tolist())


@rule("Shape")
def shape_(ctx, x, *, start=0, end=None):
    return np.array(ctx.in_shape(0)[start:end], dtype=np.int64)
