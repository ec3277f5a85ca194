"""Channels-last Resize, DepthToSpace and SpaceToDepth.

ONNX Resize has many coordinate conventions; TFLite has two kernels (nearest, bilinear) with
two switches (align_corners, half_pixel_centers). Rather than trusting a table, the rule
computes, for the actual sizes, which source index ONNX would read for every output index
and picks the TFLite variant that reads exactly the same ones; if none does, the node is
reported as unsupported.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite.registry import rule
from edgec.passes.layout import CL_DOMAIN

# (align_corners, half_pixel_centers) variants TFLite's resize kernels offer.
_TF_VARIANTS = ((False, False), (True, False), (False, True))


@keras.utils.register_keras_serializable(package="edgec")
class Resize2D(keras.layers.Layer):
    """TFLite's RESIZE_NEAREST_NEIGHBOR / RESIZE_BILINEAR with explicit coordinate switches."""

    def __init__(self, size, method, align_corners=False, half_pixel_centers=False, **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(int(s) for s in size)
        self.method = method
        self.align_corners = bool(align_corners)
        self.half_pixel_centers = bool(half_pixel_centers)

    def call(self, x):
        op = tf.raw_ops.ResizeNearestNeighbor if self.method == "nearest" else tf.raw_ops.ResizeBilinear
        return op(images=x, size=self.size, align_corners=self.align_corners, half_pixel_centers=self.half_pixel_centers)

    def get_config(self):
        return {**super().get_config(), "size": self.size, "method": self.method,
                "align_corners": self.align_corners, "half_pixel_centers": self.half_pixel_centers}


def _onnx_coordinate(x: np.ndarray, size_in: int, size_out: int, mode: str) -> np.ndarray | None:
    scale = size_out / size_in
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (size_in - 1) / (size_out - 1) if size_out > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    return None


_ROUNDING = {
    "round_prefer_floor": lambda v: np.ceil(v - 0.5),
    "round_prefer_ceil": lambda v: np.floor(v + 0.5),
    "floor": np.floor,
    "ceil": np.ceil,
}


def _tf_coordinate(x: np.ndarray, size_in: int, size_out: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    if align_corners and size_out > 1:
        return x * (size_in - 1) / (size_out - 1)
    scale = size_in / size_out
    return (x + 0.5) * scale - 0.5 if half_pixel else x * scale


def _tf_nearest(x, size_in, size_out, align_corners, half_pixel) -> np.ndarray:
    if align_corners and size_out > 1:
        src = np.round(x * (size_in - 1) / (size_out - 1))
    elif half_pixel:
        src = np.floor((x + 0.5) * size_in / size_out)
    else:
        src = np.floor(x * size_in / size_out)
    return np.clip(src, 0, size_in - 1)


def _matching_variant(sizes_in, sizes_out, mode, ctm, nearest_mode):
    """The first TFLite (align_corners, half_pixel) whose sampling equals ONNX's on every axis."""
    for align_corners, half_pixel in _TF_VARIANTS:
        if all(_same_sampling(i, o, mode, ctm, nearest_mode, align_corners, half_pixel) for i, o in zip(sizes_in, sizes_out)):
            return align_corners, half_pixel
    return None


def _same_sampling(size_in, size_out, mode, ctm, nearest_mode, align_corners, half_pixel) -> bool:
    x = np.arange(size_out, dtype=np.float64)
    onnx = _onnx_coordinate(x, size_in, size_out, ctm)
    if onnx is None:
        return False
    if mode == "nearest":
        want = np.clip(_ROUNDING[nearest_mode](onnx), 0, size_in - 1)
        return np.array_equal(want, _tf_nearest(x, size_in, size_out, align_corners, half_pixel))
    tf_coord = _tf_coordinate(x, size_in, size_out, align_corners, half_pixel)
    # Both kernels clamp below at 0 and interpolate between floor and floor+1 (clamped).
    return np.allclose(np.clip(onnx, 0, None), np.clip(tf_coord, 0, None), atol=1e-9)


@rule("Resize", domain=CL_DOMAIN)
def resize(ctx, x, roi=None, scales=None, sizes=None, *, antialias=0, axes=None, coordinate_transformation_mode="half_pixel",
           cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, keep_aspect_ratio_policy="stretch",
           mode="nearest", nearest_mode="round_prefer_floor"):
    if mode not in ("nearest", "linear"):
        ctx.unsupported(f"mode '{mode}' (TFLite resizes with nearest or bilinear only)")
    if antialias:
        ctx.unsupported("antialiased resize")
    sizes_in, sizes_out = ctx.in_shape(0)[1:3], ctx.out_shape(0)[1:3]
    variant = _matching_variant(sizes_in, sizes_out, mode, coordinate_transformation_mode, nearest_mode)
    if variant is None:
        ctx.unsupported(f"{mode} resize with coordinate_transformation_mode '{coordinate_transformation_mode}'"
                        + (f" and nearest_mode '{nearest_mode}'" if mode == "nearest" else "")
                        + f" from {sizes_in} to {sizes_out} has no exact TFLite equivalent")
    method = "nearest" if mode == "nearest" else "bilinear"
    return Resize2D(sizes_out, method, *variant, name=ctx.name())(x)


@rule("Resize")
def resize_left_channels_first(ctx, x, roi=None, scales=None, sizes=None, **attributes):
    """A Resize the layout pass did not make channels-last: the reason TFLite cannot take it."""
    rank = len(ctx.in_shape(0))
    if rank != 4:
        ctx.unsupported(f"a {rank}-D resize (TFLite resizes 4-D images)")
    for name, value in (("scales", scales), ("sizes", sizes)):
        if value is not None and not isinstance(value, np.ndarray):
            ctx.unsupported(f"its {name} is computed at run time; TFLite needs it constant")
    if tuple(ctx.in_shape(0)[:2]) != tuple(ctx.out_shape(0)[:2]):
        ctx.unsupported("it resizes the batch or channel axis (TFLite resizes height and width)")
    ctx.unsupported("it could not be run channels-last")


@rule("GridSample")
def grid_sample(ctx, x, grid, *, align_corners=0, mode="linear", padding_mode="zeros"):
    """Sampling [N, C, H, W] at the grid's (x, y) points in [-1, 1] (spatial transformers, flow
    warping) as GATHER_NDs of the pixels around each point: bilinear weights of four, or the
    nearest one (ties to even, as PyTorch)."""
    if len(ctx.in_shape(0)) != 4:
        ctx.unsupported("volumetric (5-D) sampling")
    if mode not in ("linear", "bilinear", "nearest") or padding_mode not in ("zeros", "border"):
        ctx.unsupported(f"mode '{mode}' with padding_mode '{padding_mode}'")
    batch, _, height, width = ctx.in_shape(0)
    pixels = tf.transpose(x, (0, 2, 3, 1))
    along = {axis: _denormalized(grid[..., axis], size, bool(align_corners), padding_mode) for axis, size in ((0, width), (1, height))}
    images = np.broadcast_to(np.arange(batch, dtype=np.int32).reshape(-1, 1, 1), ctx.in_shape(1)[:3])

    def at(row, column):
        return _pixel(pixels, images, row, column, height, width, padding_mode)

    if mode == "nearest":
        sampled = at(tf.math.round(along[1]), tf.math.round(along[0]))
    else:
        left, top = tf.math.floor(along[0]), tf.math.floor(along[1])
        right_share, bottom_share = tf.expand_dims(along[0] - left, -1), tf.expand_dims(along[1] - top, -1)
        upper = at(top, left) * (1.0 - right_share) + at(top, left + 1.0) * right_share
        lower = at(top + 1.0, left) * (1.0 - right_share) + at(top + 1.0, left + 1.0) * right_share
        sampled = upper * (1.0 - bottom_share) + lower * bottom_share
    return tf.transpose(sampled, (0, 3, 1, 2))


def _denormalized(normalized, size: int, align_corners: bool, padding_mode: str):
    """A grid coordinate in pixels; with border padding, clamped into the image."""
    pixel = (normalized + 1.0) * (0.5 * (size - 1)) if align_corners else ((normalized + 1.0) * size - 1.0) * 0.5
    return tf.clip_by_value(pixel, 0.0, size - 1.0) if padding_mode == "border" else pixel


def _pixel(pixels, images, row, column, height: int, width: int, padding_mode: str):
    """[N, Ho, Wo, C]: the pixel at (row, column) of each point; zeros outside unless border."""
    rows, columns = tf.cast(row, tf.int32), tf.cast(column, tf.int32)
    inside = None
    if padding_mode == "zeros":
        inside = tf.cast((rows >= 0) & (rows < height) & (columns >= 0) & (columns < width), pixels.dtype)
    rows, columns = tf.clip_by_value(rows, 0, height - 1), tf.clip_by_value(columns, 0, width - 1)
    values = tf.gather_nd(pixels, tf.stack([images, rows, columns], axis=-1))
    return values if inside is None else values * tf.expand_dims(inside, -1)


@rule("DepthToSpace", domain=CL_DOMAIN)
def depth_to_space(ctx, x, *, blocksize, mode="DCR"):
    if mode == "DCR":
        return tf.nn.depth_to_space(x, blocksize)
    if mode != "CRD":
        ctx.unsupported(f"mode '{mode}'")
    return _column_row_depth_to_space(x, ctx.in_shape(0), blocksize)


def _column_row_depth_to_space(x, shape, b: int):
    """CRD (PyTorch's PixelShuffle), which reads channel ``c·b² + i·b + j`` into block offset
    (i, j) where TFLite's DCR reads channel ``(i·b + j)·C + c``: one 5-D transpose, the
    (N·H, W, C, b, b) view to (N·H, b, W, b, C)."""
    n, h, w, depth = shape
    blocks = tf.reshape(x, (n * h, w, depth // (b * b), b, b))
    return tf.reshape(tf.transpose(blocks, (0, 3, 1, 4, 2)), (n, h * b, w * b, depth // (b * b)))


@rule("SpaceToDepth", domain=CL_DOMAIN)
def space_to_depth(ctx, x, *, blocksize):
    return tf.nn.space_to_depth(x, blocksize)

