"""ONNX explicit/auto padding → Keras 'same'/'valid' or an explicit pad, shared by conv and pools.

ONNX pads each spatial axis by (begin, end); Keras offers 'valid' (none) and 'same'
(TensorFlow's split, the extra pixel at the end). Where ONNX's pads equal one of those no pad
op is emitted; otherwise the tensor is padded explicitly and the layer runs 'valid'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Pads = list[tuple[int, int]]


def onnx_pads(
    auto_pad: str,
    pads: Sequence[int] | None,
    in_sizes: Sequence[int],
    out_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> Pads:
    """Per spatial axis (begin, end) padding actually read to produce ``out_sizes``."""
    n = len(in_sizes)
    result = []
    for i in range(n):
        extent = (out_sizes[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        total = max(extent - in_sizes[i], 0)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            small = total // 2
            begin = small if auto_pad == "SAME_UPPER" else total - small
        elif auto_pad == "VALID":
            begin = 0
        else:
            begin = int(pads[i]) if pads else 0
        # The end pad that is really read (ceil_mode or extra pads beyond the last window).
        result.append((begin, max(extent - in_sizes[i] - begin, 0)))
    return result


def tf_same_pads(in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> Pads:
    result = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        result.append((total // 2, total - total // 2))
    return result


def keras_padding(pads: Pads, in_sizes, kernel, strides, dilations) -> str | None:
    """'valid' or 'same' when the pads match one of them exactly, else None."""
    if all(b == 0 and e == 0 for b, e in pads):
        return "valid"
    if pads == tf_same_pads(in_sizes, kernel, strides, dilations):
        return "same"
    return None
