"""Channels-last convolutions and pools → Keras Conv*/DepthwiseConv*/Conv*Transpose/pool layers.

Inputs are NHWC (NWC for 1-D) — the layout pass guarantees it for ``edgec.channels_last`` ops
— while weights arrive in ONNX layout and are transposed to Keras's here.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.ops.padding import keras_padding, onnx_pads
from edgec.lower.tflite.registry import rule
from edgec.passes.layout import CL_DOMAIN

# Float32 lowest: padding value under which a max pool never picks the pad.
_LAYERS = {
    1: {"conv": keras.layers.Conv1D, "depthwise": keras.layers.DepthwiseConv1D, "transpose": keras.layers.Conv1DTranspose,
        "zero_pad": keras.layers.ZeroPadding1D, "crop": keras.layers.Cropping1D, "max": keras.layers.MaxPool1D,
        "avg": keras.layers.AveragePooling1D, "gap": keras.layers.GlobalAveragePooling1D, "gmp": keras.layers.GlobalMaxPool1D},
    2: {"conv": keras.layers.Conv2D, "depthwise": keras.layers.DepthwiseConv2D, "transpose": keras.layers.Conv2DTranspose,
        "zero_pad": keras.layers.ZeroPadding2D, "crop": keras.layers.Cropping2D, "max": keras.layers.MaxPool2D,
        "avg": keras.layers.AveragePooling2D, "gap": keras.layers.GlobalAveragePooling2D, "gmp": keras.layers.GlobalMaxPool2D},
}


def _layers(ctx, rank: int) -> dict:
    if rank - 2 not in _LAYERS:
        ctx.unsupported(f"{rank - 2}-D spatial data (1-D and 2-D are supported)")
    return _LAYERS[rank - 2]


def _geometry(ctx, kernel_shape, strides, dilations):
    spatial_in = ctx.in_shape(0)[1:-1]
    spatial_out = ctx.out_shape(0)[1:-1]
    n = len(spatial_in)
    return spatial_in, spatial_out, list(kernel_shape), list(strides or [1] * n), list(dilations or [1] * n)


def _zero_pad(ctx, x, pads, layers_):
    return layers_["zero_pad"](_spec(pads), name=ctx.name("_pad"))(x)


def _edge_pad(ctx, x, pads, layers_):
    """Replicate border values outwards, one row/column per step (SYMMETRIC mirror pad).

    For undilated max pooling this is exact: every window that reads a pad position also
    reads the border value it copies. Unlike padding with -FLT_MAX it keeps the tensor's
    range, which int8 calibration needs.
    """
    remaining = [list(p) for p in pads]
    while any(max(p) > 0 for p in remaining):
        step = [[min(before, 1), min(after, 1)] for before, after in remaining]
        x = tf.pad(x, [[0, 0], *step, [0, 0]], mode="SYMMETRIC")
        remaining = [[before - b, after - a] for (before, after), (b, a) in zip(remaining, step)]
    return x


def _padded(ctx, x, auto_pad, pads, geometry, layers_, pad=_zero_pad):
    """(input, keras padding): pads that Keras cannot express are applied explicitly."""
    spatial_in, spatial_out, kernel, strides, dilations = geometry
    per_axis = onnx_pads(auto_pad, pads, spatial_in, spatial_out, kernel, strides, dilations)
    padding = keras_padding(per_axis, spatial_in, kernel, strides, dilations)
    if padding is not None:
        return x, padding
    return pad(ctx, x, per_axis, layers_), "valid"


@rule("Conv", domain=CL_DOMAIN)
def conv(ctx, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None, pads=None, strides=None):
    w = ctx.require_constant(w, "weight")
    b = None if b is None else ctx.require_constant(b, "bias")
    geometry = _geometry(ctx, kernel_shape or w.shape[2:], strides, dilations)
    _, _, kernel, strides_, dilations_ = geometry
    layers_ = _layers(ctx, w.ndim)
    out_steps = None
    if max(strides_) > 1 and max(dilations_) > 1:
        x, dilations_, out_steps = _strided_dilated(ctx, x, auto_pad, pads, geometry, layers_)
        strides_, padding = [1] * len(strides_), "valid"
    else:
        x, padding = _padded(ctx, x, auto_pad, pads, geometry, layers_)
    cin, cout = ctx.in_shape(0)[-1], w.shape[0]
    common = dict(strides=strides_, padding=padding, dilation_rate=dilations_, use_bias=b is not None, name=ctx.name())
    to_keras = (*range(2, w.ndim), 1, 0)  # [O, I, k...] → [k..., I, O]
    if group == cin and group > 1 and cout % cin == 0:
        multiplier = cout // cin
        layer = layers_["depthwise"](kernel, depth_multiplier=multiplier, **common)
        kernel_w = w.reshape((cin, multiplier) + w.shape[2:]).transpose(*range(2, w.ndim), 0, 1)
    else:
        layer = layers_["conv"](cout, kernel, groups=group, **common)
        kernel_w = w.transpose(to_keras)
    y = layer(x)
    layer.set_weights([kernel_w] + ([b] if b is not None else []))
    return y if out_steps is None else _every(y, out_steps)


def _strided_dilated(ctx, x, auto_pad, pads, geometry, layers_):
    """TFLite convolutions take a stride or a dilation, not both (SKNet's, DeepLab's convs).

    Along an axis, output i reads padded input s·i + d·k. Where s divides d those are every
    s-th position, so the conv runs dilated d/s over the input sampled every s (no extra work);
    otherwise it runs at stride 1 and its output is sampled every s. Both are exact.
    Returns (padded, sampled input; the layer's dilations; output steps)."""
    spatial_in, spatial_out, kernel, strides, dilations = geometry
    per_axis = onnx_pads(auto_pad, pads, spatial_in, spatial_out, kernel, strides, dilations)
    if any(max(p) > 0 for p in per_axis):
        x = _zero_pad(ctx, x, per_axis, layers_)
    in_steps = [s if d % s == 0 else 1 for s, d in zip(strides, dilations)]
    return _every(x, in_steps), [d // i for d, i in zip(dilations, in_steps)], [s // i for s, i in zip(strides, in_steps)]


def _every(x, steps):
    """x sampled every steps[a] positions along each spatial axis (a STRIDED_SLICE)."""
    if max(steps) == 1:
        return x
    return x[(slice(None), *(slice(None, None, step) for step in steps), slice(None))]


@rule("ConvTranspose", domain=CL_DOMAIN)
def conv_transpose(ctx, x, w, b=None, *, auto_pad="NOTSET", dilations=None, group=1, kernel_shape=None,
                   output_padding=None, output_shape=None, pads=None, strides=None):
    w = ctx.require_constant(w, "weight")
    b = None if b is None else ctx.require_constant(b, "bias")
    if group != 1:
        ctx.unsupported("grouped transposed convolution")
    layers_ = _layers(ctx, w.ndim)
    n = w.ndim - 2
    strides_, dilations_ = list(strides or [1] * n), list(dilations or [1] * n)
    crops = _transpose_crops(ctx, w.shape[2:], strides_, dilations_, auto_pad, pads)
    grows = any(end < 0 for _, end in crops)  # output_padding: rows past the full extent
    layer = layers_["transpose"](w.shape[1], w.shape[2:], strides=strides_, padding="valid",
                                 dilation_rate=dilations_, use_bias=b is not None and not grows, name=ctx.name())
    y = layer(x)
    layer.set_weights([w.transpose(*range(2, w.ndim), 1, 0)] + ([b] if b is not None and not grows else []))
    if grows:
        y = layers_["zero_pad"](_spec([(0, max(-end, 0)) for _, end in crops]), name=ctx.name("_outpad"))(y)
        crops = [(begin, max(end, 0)) for begin, end in crops]
    if any(c != (0, 0) for c in crops):
        y = layers_["crop"](_spec(crops), name=ctx.name("_crop"))(y)
    return y + b if b is not None and grows else y


def _transpose_crops(ctx, kernel, strides, dilations, auto_pad, pads) -> list[tuple[int, int]]:
    """(begin, end) to crop from the 'valid' result; a negative end means grow instead."""
    crops = []
    for i, (size, want) in enumerate(zip(ctx.in_shape(0)[1:-1], ctx.out_shape(0)[1:-1])):
        full = (size - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full - want
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        else:
            begin = int(pads[i]) if pads else 0
        crops.append((begin, total - begin))
    return crops


def _spec(pairs):
    """Keras padding/cropping argument: a pair for 1-D, a tuple of pairs for 2-D."""
    return tuple(pairs) if len(pairs) > 1 else pairs[0]


@rule("MaxPool", domain=CL_DOMAIN)
def max_pool(ctx, x, *, auto_pad="NOTSET", ceil_mode=0, dilations=None, kernel_shape=None, pads=None, storage_order=0, strides=None):
    geometry = _geometry(ctx, kernel_shape, strides, dilations)
    if max(geometry[4]) > 1:
        ctx.unsupported("dilated max pooling")
    layers_ = _layers(ctx, len(ctx.in_shape(0)))
    x, padding = _padded(ctx, x, auto_pad, pads, geometry, layers_, pad=_edge_pad)
    return layers_["max"](geometry[2], strides=geometry[3], padding=padding, name=ctx.name())(x)


@rule("AveragePool", domain=CL_DOMAIN)
def average_pool(ctx, x, *, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, kernel_shape=None, pads=None, strides=None):
    geometry = _geometry(ctx, kernel_shape, strides, dilations)
    spatial_in, spatial_out, kernel, strides_, dilations_ = geometry
    if max(dilations_) > 1:
        ctx.unsupported("dilated average pooling")
    layers_ = _layers(ctx, len(ctx.in_shape(0)))
    per_axis = onnx_pads(auto_pad, pads, spatial_in, spatial_out, kernel, strides_, dilations_)
    padding = keras_padding(per_axis, spatial_in, kernel, strides_, dilations_)
    if padding == "valid" or (padding == "same" and not count_include_pad):
        return layers_["avg"](kernel, strides=strides_, padding=padding, name=ctx.name())(x)
    padded = _zero_pad(ctx, x, per_axis, layers_)
    y = layers_["avg"](kernel, strides=strides_, padding="valid", name=ctx.name())(padded)
    if count_include_pad:
        return y
    return y * _pad_exclusion_scale(spatial_in, per_axis, kernel, strides_, spatial_out)


def _pad_exclusion_scale(spatial_in, pads, kernel, strides, spatial_out) -> np.ndarray:
    """Per output position: window area / real (non-pad) elements in the window."""
    ones = np.pad(np.ones(spatial_in, np.float64), pads)
    counts = np.zeros(spatial_out)
    for index in np.ndindex(*spatial_out):
        window = tuple(slice(i * s, i * s + k) for i, s, k in zip(index, strides, kernel))
        counts[index] = ones[window].sum()
    scale = np.prod(kernel) / np.maximum(counts, 1)
    return scale.reshape((1, *spatial_out, 1)).astype(np.float32)


@rule("GlobalAveragePool", domain=CL_DOMAIN)
def global_average_pool(ctx, x):
    return _layers(ctx, len(ctx.in_shape(0)))["gap"](keepdims=True, name=ctx.name())(x)


@rule("GlobalMaxPool", domain=CL_DOMAIN)
def global_max_pool(ctx, x):
    return _layers(ctx, len(ctx.in_shape(0)))["gmp"](keepdims=True, name=ctx.name())(x)
