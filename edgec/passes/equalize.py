"""Cross-layer equalization: balance per-channel weight ranges before int8 quantization.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction"
(AIMET's ``cross_layer_equalization`` is the reference implementation). A layer whose output
channels have very different weight ranges loses most of them to a per-tensor int8 scale.
Between two layers joined through a positive-homogeneous activation (``f(s·x) = s·f(x)`` for
``s > 0``: Relu, LeakyRelu, PRelu, or none) channel ``i`` can be divided by ``s_i`` in the
first layer and multiplied back in the second without changing the function; choosing
``s_i = sqrt(r1_i · r2_i) / r2_i`` gives both layers the range ``sqrt(r1_i · r2_i)``.

Layers are Conv (grouped and depthwise included) and Gemm with constant weights used by
nothing else. A depthwise conv's input and output channels coincide, so in conv → dw → conv
it is the consumer of one pair and the producer of the next; equalizing pairs in turn until
the scales settle reaches AIMET's closed-form three-layer solution (all three ranges equal to
the cube root of their product), and also balances longer chains of ordinary convs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.activations import activations
from edgec.graph import attr, constant, input_or_attr, replace_initializer_data, set_bias, sole_consumer, take_name
from edgec.passes.pipeline import PassOutcome
from edgec.verify import Sample
from edgec.weights import weight_from_view, weight_view

LAYER_OPS = ("Conv", "Gemm")
HOMOGENEOUS_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu")
# A sweep whose scales all lie within this factor of 1 (in log terms) ends the iteration.
CONVERGED_LOG_SCALE = 1e-4
# Activation equalization shrinks only channels wider than this many times the median channel, to that width,
# and only where that narrows the tensor's range at least MIN_SHRINK times: a few percent buys no int8 precision,
# yet moved face_landmark's ORT rounding enough to cost it a float layer.
OUTLIER = 4.0
MIN_SHRINK = 1.25  # BlazeFace's links narrow 1.5-26x; at 2x its TFLite search kept 78% of the MACs float, not 61%


@dataclasses.dataclass
class _Layer:
    """A layer's parameters in float64 while the scales are searched."""

    node: ir.Node
    view: np.ndarray  # see weight_view
    bias: np.ndarray | None  # last axis = output channels

    def out_ranges(self) -> np.ndarray:
        return np.abs(self.view).max(axis=(2, 3)).reshape(-1)

    def in_ranges(self) -> np.ndarray:
        return np.abs(self.view).max(axis=(1, 3)).reshape(-1)

    def divide_outputs(self, scale: np.ndarray) -> None:
        self.view = self.view / scale.reshape(self.view.shape[0], -1, 1, 1)
        if self.bias is not None:
            self.bias = np.broadcast_to(self.bias, self.bias.shape[:-1] + scale.shape) / scale

    def multiply_inputs(self, scale: np.ndarray) -> None:
        self.view = self.view * scale.reshape(self.view.shape[0], 1, -1, 1)


@dataclasses.dataclass
class _Link:
    producer: _Layer
    consumer: _Layer
    clip: ir.Node | None  # a ReLU6 between them, to become Relu


class CrossLayerEqualization(ir.passes.InPlacePass):
    """Rescale channels between consecutive Conv/Gemm layers so their weight ranges match.

    Exact (fp32, up to rounding) except with ``relu6_to_relu=True``: ReLU6 (``Clip(0, 6)``)
    is not scale-equivariant, so as in AIMET it is replaced by Relu between equalized layers,
    which *changes the function* wherever an activation exceeded 6. The record lists each one.

    Record: ``pairs`` ([producer, consumer] node names), ``iterations`` and ``converged``,
    ``replaced_clips``, and ``range_spread_before``/``_after`` (see :func:`_mean_spread`).
    """

    name = "cross-layer-equalization"

    def __init__(self, relu6_to_relu: bool = False, max_iterations: int = 20) -> None:
        """``max_iterations`` caps the sweeps over all pairs; a sweep changing no scale by
        more than 0.01% ends them earlier."""
        self.relu6_to_relu = relu6_to_relu
        self.max_iterations = max_iterations

    def call(self, model: ir.Model) -> PassOutcome:
        links = _find_links(model.graph, self.relu6_to_relu)
        layers = list({id(layer.node): layer for link in links for layer in (link.producer, link.consumer)}.values())
        before = _mean_spread(layers)
        iterations, converged = 0, not links
        while not converged and iterations < self.max_iterations:
            iterations += 1
            converged = max(_equalize(link) for link in links) < CONVERGED_LOG_SCALE
        for layer in layers:
            _write_back(model.graph, layer)
        replaced = [_clip_to_relu(model.graph, link.clip) for link in links if link.clip is not None]
        return PassOutcome(model, bool(links), {
            "pairs": [[link.producer.node.name, link.consumer.node.name] for link in links],
            "iterations": iterations,
            "converged": converged,
            "replaced_clips": replaced,
            "range_spread_before": before,
            "range_spread_after": _mean_spread(layers),
        })


def _find_links(graph: ir.Graph, relu6_to_relu: bool) -> list[_Link]:
    """Every producer → (activation) → consumer pair, in graph order."""
    layers: dict[int, _Layer] = {}

    def layer(node: ir.Node) -> _Layer:
        return layers.setdefault(id(node), _load_layer(node))

    links = []
    for node in graph:
        found = _next_layer(node, relu6_to_relu) if _scalable(node) else None
        if found is None:
            continue
        link = _Link(layer(node), layer(found[0]), found[1])
        if link.producer.out_ranges().shape == link.consumer.in_ranges().shape:
            links.append(link)
    return links


def _next_layer(node: ir.Node, relu6_to_relu: bool) -> tuple[ir.Node, ir.Node | None] | None:
    """The layer ``node`` alone feeds, directly or through one activation read by nothing
    else, and the ReLU6 on the way if there is one to replace."""
    value = node.outputs[0]
    between = sole_consumer(value)
    clip = between if between is not None and relu6_to_relu and _is_relu6(between) else None
    if between is not None and between.inputs[0] is value and (_is_onnx(between, *HOMOGENEOUS_ACTIVATIONS) or clip is not None):
        value = between.outputs[0]
    consumer = sole_consumer(value)
    if consumer is None or not _scalable(consumer) or consumer.inputs[0] is not value:
        return None
    return consumer, clip


def _is_onnx(node: ir.Node, *op_types: str) -> bool:
    return node.op_type in op_types and node.domain in ("", "ai.onnx")


def _scalable(node: ir.Node) -> bool:
    """A Conv, or a Gemm reading its input untransposed (channels last), whose weight is a
    constant no other node uses and whose bias, if any, is a constant."""
    if not _is_onnx(node, *LAYER_OPS) or len(node.inputs) < 2:
        return False
    weight, bias = node.inputs[1], (node.inputs[2] if len(node.inputs) > 2 else None)
    if constant(weight) is None or len(weight.uses()) != 1 or weight.is_graph_input():
        return False
    if bias is not None and constant(bias) is None:
        return False
    return node.op_type == "Conv" or (constant(weight).ndim == 2 and not attr(node, "transA", 0))


def _is_relu6(node: ir.Node) -> bool:
    if not _is_onnx(node, "Clip"):
        return False
    low, high = input_or_attr(node, 1, "min"), input_or_attr(node, 2, "max")
    return low == 0 and high == 6


def _load_layer(node: ir.Node) -> _Layer:
    weight = constant(node.inputs[1]).astype(np.float64)
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return _Layer(node, weight_view(node, weight), None if bias is None else bias.astype(np.float64))


def _equalize(link: _Link) -> float:
    """Equalize one pair's shared channels; returns the largest |log scale| applied."""
    r1, r2 = link.producer.out_ranges(), link.consumer.in_ranges()
    # A channel with an all-zero side has nothing to balance (AIMET leaves it at 1 too).
    usable = (r1 > 0) & (r2 > 0)
    scale = np.where(usable, np.sqrt(r1 * r2) / np.where(usable, r2, 1.0), 1.0)
    link.producer.divide_outputs(scale)
    link.consumer.multiply_inputs(scale)
    return float(np.abs(np.log(scale)).max())


def _write_back(graph: ir.Graph, layer: _Layer) -> None:
    original = constant(layer.node.inputs[1])
    weight = weight_from_view(layer.node, layer.view, original.shape)
    replace_initializer_data(layer.node.inputs[1], weight.astype(original.dtype))
    if layer.bias is not None:
        set_bias(graph, layer.node, 2, layer.bias.astype(original.dtype))


def _clip_to_relu(graph: ir.Graph, clip: ir.Node) -> str:
    old, bounds = clip.outputs[0], [v for v in clip.inputs[1:] if v is not None]
    relu = ir.node("Relu", [clip.inputs[0]], name=f"{clip.name}_relu")
    relu.outputs[0].dtype, relu.outputs[0].shape = old.dtype, old.shape
    graph.insert_before(clip, relu)
    old.replace_all_uses_with(relu.outputs[0])
    take_name(relu.outputs[0], old, graph)
    graph.remove(clip, safe=True)
    for bound in bounds:  # the 0 and 6, unless something else reads them
        if bound.is_initializer() and not bound.uses() and not bound.is_graph_output():
            graph.initializers.pop(bound.name)
    return clip.name


def _mean_spread(layers: list[_Layer]) -> float | None:
    """Mean over layers of (largest / median output-channel weight range): how far the widest
    channel outgrows a typical one. The median, not the minimum, so that a dead channel
    (range near zero) does not swamp the figure."""
    spreads = []
    for layer in layers:
        ranges = layer.out_ranges()
        ranges = ranges[ranges > 0]
        if ranges.size:
            spreads.append(ranges.max() / np.median(ranges))
    return round(float(np.mean(spreads)), 4) if spreads else None


class ActivationEqualization(ir.passes.InPlacePass):
    """Shrink the activation channels that set a tensor's int8 range, moving their scale into
    the next Conv's weights (data-aware; exact in float, like ``CrossLayerEqualization``).

    An int8 activation has one scale per tensor: one channel far wider than the rest makes
    every other channel coarse (BlazeFace's last depthwise conv: one channel reaches −275,
    the other 95 stay within ±21, so its int8 step was 1.1). On calibration data each link
    producer → (Relu/PRelu/LeakyRelu) → Conv gets per-channel ranges ``a`` of the producer's
    output, and channel ``j`` is divided by ``s_j ≥ 1`` in the producer (its per-channel
    weight scale absorbs that) and multiplied back in the consumer's input channel:

    * a depthwise consumer (per-channel weights absorb ``s_j`` too): every channel wider
      than ``OUTLIER`` × the median channel is shrunk to that width;
    * another Conv: the same, but at most ``s_j = sqrt((a_j / median a) / (w_j / median w))``
      (SmoothQuant's balance, α = ½, relative to the typical channel), ``w_j`` the largest
      weight reading channel ``j``, so a column grows only as much as its activation shrinks.

    Only outliers move: shrinking every channel wider than the median (a first version)
    grew ORT's 7-bit weight grids enough to fail selfie_segmentation's held-out check.

    Only for per-channel weight schemes (a grown column would coarsen a per-tensor weight
    scale). Record: per link equalized, the producer output's range before and after.
    """

    name = "activation-equalization"

    def __init__(self, calibration: Sequence[Sample], max_scale: float = 1000.0) -> None:
        if len(calibration) == 0:
            raise ValueError("ActivationEqualization needs at least one calibration sample.")
        self.calibration, self.max_scale = calibration, max_scale

    def call(self, model: ir.Model) -> PassOutcome:
        links = [link for link in _find_links(model.graph, False) if link.consumer.node.op_type == "Conv"]
        ranges = _channel_ranges(model, [link.producer.node.outputs[0] for link in links], self.calibration)
        shrunk = {}
        for link in links:
            a = ranges[link.producer.node.outputs[0].name]
            scale = np.clip(_activation_scale(a, link.consumer), 1.0, self.max_scale)
            if a.max() >= MIN_SHRINK * (a / scale).max():
                link.producer.divide_outputs(scale)
                link.consumer.multiply_inputs(scale)
                shrunk[link.producer.node.name] = [round(float(a.max()), 4), round(float((a / scale).max()), 4)]
        for layer in {id(layer.node): layer for link in links for layer in (link.producer, link.consumer)}.values():
            _write_back(model.graph, layer)
        return PassOutcome(model, bool(shrunk), {"links": len(links), "range_before_after": shrunk})


def _channel_ranges(model: ir.Model, values: list[ir.Value], calibration: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Per value (NCHW Conv outputs), each channel's largest |value| over the calibration samples."""
    ranges: dict[str, np.ndarray] = {}
    for arrays in activations(model, values, calibration) if values else ():
        for name, array in arrays.items():
            x = np.abs(np.moveaxis(np.asarray(array), 1, 0)).reshape(array.shape[1], -1).max(axis=1)
            ranges[name] = np.maximum(ranges.get(name, x), x)
    return ranges


def _activation_scale(a: np.ndarray, consumer: _Layer) -> np.ndarray:
    """``s_j`` for one link (see ``ActivationEqualization``): > 1 only for channels wider
    than ``OUTLIER`` times the median one; 1 for dead channels."""
    live = a > 0
    if not live.any():
        return np.ones_like(a)
    cap = OUTLIER * np.median(a[live])
    down = np.where(live, a / cap, 1.0)
    if consumer.view.shape[1] == 1 and consumer.view.shape[2] == 1:  # depthwise: its per-channel scales absorb s
        return down
    w = consumer.in_ranges()
    usable = live & (w > 0)
    if not usable.any():
        return np.ones_like(a)
    ratio = (a / np.median(a[live])) / np.where(usable, w / np.median(w[usable]), 1.0)
    return np.where(usable, np.minimum(down, np.sqrt(np.maximum(ratio, 0.0))), 1.0)
