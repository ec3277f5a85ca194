"""The configurations calibration samples: one small ONNX model per kernel configuration.

Each sample is one ONNX operator (a convolution with its bias and Relu, a pooling, an
elementwise op...) on random weights, in NCHW as models come, with sizes drawn log-uniformly
over the range edge models use. edgec's own lowering then makes the artifact the device
runs, so the kernels measured are exactly those a real build produces. A standalone Relu is
kept float by the int8 lowering (XNNPACK has no int8 Relu): with int8 I/O it measures the
float ↔ int8 conversions around it, which is how conversions get their data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MAX_MACS = 60e6  # keeps one sample a fraction of a second on an emulated core


@dataclasses.dataclass(frozen=True)
class Sample:
    """One configuration: which operator, at which precision, with which sizes."""

    op: str
    precision: str
    sizes: dict[str, int]

    def to_dict(self) -> dict:
        return {"op": self.op, "precision": self.precision, "sizes": self.sizes}


def _log_int(rng: np.random.Generator, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def _channels(rng: np.random.Generator, low: int, high: int) -> int:
    """Log-uniform; half the time a multiple of 8, as networks' widths mostly are (XNNPACK's
    micro-kernels compute 8 or 16 channels at once, so the remainder changes the cost)."""
    c = _log_int(rng, low, high)
    return max(8, int(round(c / 8)) * 8) if rng.random() < 0.5 else c


def _spatial(rng: np.random.Generator) -> dict[str, int]:
    return {"h": _log_int(rng, 2, 112), "c": _channels(rng, 4, 512)}


def _conv(rng: np.random.Generator) -> dict[str, int]:
    spatial = _spatial(rng)  # output channels within 4x of the input's, as networks have them
    cout = _channels(rng, max(4, spatial["c"] // 4), min(1024, spatial["c"] * 4))
    k = int(rng.choice([1, 1, 1, 1, 2, 3, 3, 5, 7]))  # pointwise convolutions dominate mobile networks
    return {**spatial, "cout": cout, "k": k, "stride": 2 if k == 2 else int(rng.choice([1, 1, 2]))}


def _pointwise(rng: np.random.Generator) -> dict[str, int]:
    """1x1 convolutions at the sizes mobile detectors run most of their work in: large
    images, few (often not a multiple of 8) channels, where per-tile overhead rivals the MACs."""
    c = _channels(rng, 4, 128)
    return {"h": _log_int(rng, 8, 128), "c": c, "cout": _channels(rng, max(4, c // 2), min(256, c * 2)), "k": 1, "stride": 1}


def _mixed(rng: np.random.Generator) -> dict[str, int]:
    """Convolution → activation → convolution; at int8 the lowering keeps PRelu and
    hard-swish float for XNNPACK, so the chain measures the int8 ↔ float conversions around
    them as whole models pay them."""
    return {**_spatial(rng), "k": int(rng.choice([1, 3])), "act": int(rng.integers(0, 2))}


def _depthwise(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "k": int(rng.choice([1, 3, 3, 5, 5])), "stride": int(rng.choice([1, 1, 2]))}


def _fc(rng: np.random.Generator) -> dict[str, int]:
    return {"rows": int(rng.choice([1, 1, _log_int(rng, 2, 256)])), "c": _channels(rng, 8, 2048), "cout": _channels(rng, 2, 2048)}


def _pool(rng: np.random.Generator) -> dict[str, int]:
    """Mostly 2x2 or 3x3 windows; sometimes one window over the whole image (a global pooling
    written as a pooling, as MediaPipe's models do)."""
    sizes = {**_spatial(rng), "k": int(rng.choice([2, 2, 3])), "stride": int(rng.choice([1, 2, 2]))}
    if rng.random() < 0.25:
        return {**sizes, "k": sizes["h"], "stride": sizes["h"]}
    return {**sizes, "h": max(sizes["h"], sizes["k"])}


def _binary(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "broadcast": int(rng.random() < 0.4)}


def _concat(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "c2": _log_int(rng, 4, 512)}


def _chain(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "n": int(rng.integers(2, 7))}


def _deconv(rng: np.random.Generator) -> dict[str, int]:
    return {"h": _log_int(rng, 2, 64), "c": _log_int(rng, 4, 256), "cout": _log_int(rng, 1, 256),
            "k": int(rng.choice([2, 3, 4]))}


def _pad(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "c2": _log_int(rng, 1, 256), "border": int(rng.choice([0, 0, 1]))}


def _sequence(rng: np.random.Generator) -> dict[str, int]:
    """A transformer's activations: rows (tokens) by features."""
    return {"rows": _log_int(rng, 1, 256), "c": _log_int(rng, 8, 1024)}


def _batch_matmul(rng: np.random.Generator) -> dict[str, int]:
    return {"batch": _log_int(rng, 1, 12), "rows": _log_int(rng, 1, 256), "c": _log_int(rng, 8, 256),
            "cout": _log_int(rng, 1, 256)}


def _transpose(rng: np.random.Generator) -> dict[str, int]:
    return {"batch": _log_int(rng, 1, 12), "rows": _log_int(rng, 1, 256), "c": _log_int(rng, 4, 256)}


# ONNX operator sampled → how its sizes are drawn.
SIZES: dict[str, Callable[[np.random.Generator], dict[str, int]]] = {
    "Conv": _conv, "PointwiseConv": _pointwise, "MixedChain": _mixed, "DepthwiseConv": _depthwise, "Gemm": _fc, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _spatial, "Add": _binary, "Mul": _binary, "Concat": _concat,
    "HardSwish": _spatial, "Sigmoid": _spatial, "Relu": _spatial,
    "PRelu": _spatial, "ConvTranspose": _deconv, "Resize": _spatial, "Pad": _pad, "Sub": _binary, "Slice": _spatial,
    "Softmax": _sequence, "LayerNormalization": _sequence, "Gelu": _sequence, "Split": _sequence,
    "MatMul": _batch_matmul, "Transpose": _transpose, "SigmoidChain": _chain,
}


# How many of every round of samples each operator gets (default 1): where models spend
# their time, and where a kind's cost depends on the most shape numbers.
# SigmoidChain: n kernels in one model tell what each kernel costs apart from what the
# inference costs once (a single-kernel model pays both once, so it cannot).
SHARE = {"Conv": 6, "PointwiseConv": 3, "MixedChain": 2, "DepthwiseConv": 3, "Gemm": 2, "SigmoidChain": 3}


def draw(op: str, precision: str, rng: np.random.Generator) -> Sample:
    """A configuration of ``op`` no larger than ``MAX_MACS``."""
    while True:
        sizes = SIZES[op](rng)
        if _macs(op, sizes) <= MAX_MACS:
            return Sample(op, precision, sizes)


def _macs(op: str, s: dict[str, int]) -> float:
    if op in ("Conv", "PointwiseConv"):
        return (s["h"] / s["stride"]) ** 2 * s["c"] * s["cout"] * s["k"] ** 2
    if op in ("Gemm", "MatMul"):
        return s.get("batch", 1) * s["rows"] * s["c"] * s["cout"]
    if op == "ConvTranspose":
        return s["h"] ** 2 * s["c"] * s["cout"] * s["k"] ** 2
    if "rows" in s:
        return s.get("batch", 1) * s["rows"] * s["c"]
    if op == "SigmoidChain":
        return s["h"] ** 2 * s["c"] * s["n"]
    if op == "MixedChain":
        return 2 * s["h"] ** 2 * s["c"] ** 2 * s["k"] ** 2
    return s["h"] ** 2 * s["c"] * (s.get("k", 1) / s.get("stride", 1)) ** 2


def to_onnx(sample: Sample) -> onnx.ModelProto:
    """The sample as a one-kernel ONNX model (a few kernels for composite operators such as
    LayerNormalization) with seeded random weights."""
    rng = np.random.default_rng(0)
    weights: list[TensorProto] = []

    def weight(name: str, shape: list[int], scale: float = 0.1) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def constant(name: str, values: list[int]) -> str:
        weights.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    inputs, nodes = _GRAPHS.get(sample.op, _unary)(sample.op, sample.sizes, weight, constant)
    graph = helper.make_graph(nodes, f"{sample.op}_kernel", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgec-calibrate")
    model.ir_version = 8
    return model


Inputs = list[tuple[str, list[int]]]
Graph = tuple[Inputs, list[onnx.NodeProto]]


def _image(s: dict[str, int]) -> tuple[str, list[int]]:
    return "x", [1, s["c"], s["h"], s["h"]]


def _sequence_input(s: dict[str, int]) -> tuple[str, list[int]]:
    return "x", [1, s["rows"], s["c"]]


def _unary(op: str, s, weight, constant) -> Graph:
    return [_image(s)], [helper.make_node(op, ["x"], ["y"])]


def _conv(op: str, s, weight, constant) -> Graph:
    groups, cout, k = (s["c"], s["c"], s["k"]) if op == "DepthwiseConv" else (1, s["cout"], s["k"])
    return [_image(s)], [
        helper.make_node("Conv", ["x", weight("w", [cout, s["c"] // groups, k, k]), weight("b", [cout])], ["t"],
                         kernel_shape=[k, k], strides=[s["stride"]] * 2, pads=[(k - 1) // 2] * 4, group=groups),
        helper.make_node("Relu", ["t"], ["y"])]


def _conv_transpose(op: str, s, weight, constant) -> Graph:
    """Upsampling by 2, as decoders do: the output is twice the input's size whatever k."""
    k = s["k"]
    pads, extra = {2: (0, 0), 3: (1, 1), 4: (1, 0)}[k]
    return [_image(s)], [helper.make_node("ConvTranspose", ["x", weight("w", [s["c"], s["cout"], k, k]), weight("b", [s["cout"]])],
                                          ["y"], kernel_shape=[k, k], strides=[2, 2], pads=[pads] * 4, output_padding=[extra] * 2)]


def _gemm(op: str, s, weight, constant) -> Graph:
    return [("x", [s["rows"], s["c"]])], [
        helper.make_node("Gemm", ["x", weight("w", [s["c"], s["cout"]]), weight("b", [s["cout"]])], ["y"])]


def _pool(op: str, s, weight, constant) -> Graph:
    return [_image(s)], [helper.make_node(op, ["x"], ["y"], kernel_shape=[s["k"]] * 2, strides=[s["stride"]] * 2)]


def _binary(op: str, s, weight, constant) -> Graph:
    image = _image(s)
    other = [1, s["c2"], s["h"], s["h"]] if op == "Concat" else [1, s["c"], 1, 1] if s["broadcast"] else image[1]
    return [image, ("x2", other)], [helper.make_node(op, ["x", "x2"], ["y"], **({"axis": 1} if op == "Concat" else {}))]


def _prelu(op: str, s, weight, constant) -> Graph:
    return [_image(s)], [helper.make_node("PRelu", ["x", weight("slope", [s["c"], 1, 1])], ["y"])]


def _resize(op: str, s, weight, constant) -> Graph:
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    return [_image(s)], [helper.make_node("Constant", [], ["s"], value=scales),
                         helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear")]


def _pad(op: str, s, weight, constant) -> Graph:
    """Channels added (a residual to a wider block, as BlazeFace does), optionally a border."""
    b = s["border"]
    return [_image(s)], [helper.make_node("Pad", ["x", constant("pads", [0, 0, b, b, 0, s["c2"], b, b])], ["y"])]


def _slice(op: str, s, weight, constant) -> Graph:
    return [_image(s)], [helper.make_node("Slice", ["x", constant("start", [0]), constant("end", [max(1, s["c"] // 2)]),
                                                    constant("axis", [1])], ["y"])]


def _softmax(op: str, s, weight, constant) -> Graph:
    return [_sequence_input(s)], [helper.make_node("Softmax", ["x"], ["y"], axis=-1)]


def _layer_norm(op: str, s, weight, constant) -> Graph:
    return [_sequence_input(s)], [helper.make_node("LayerNormalization", ["x", weight("g", [s["c"]]), weight("b", [s["c"]])],
                                                   ["y"], axis=-1)]


def _gelu(op: str, s, weight, constant) -> Graph:
    """x · ½(1 + erf(x/√2)), the pattern exporters write; edgec's lowering fuses it into one GELU."""
    scalar = lambda name, value: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))
    return [_sequence_input(s)], [
        scalar("r2", math.sqrt(2)), scalar("one", 1.0), scalar("half", 0.5),
        helper.make_node("Div", ["x", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["y"])]


def _split(op: str, s, weight, constant) -> Graph:
    """Queries, keys and values out of one projection: three equal parts, summed so one output remains."""
    c = s["c"]
    return [("x", [1, s["rows"], 3 * c])], [
        helper.make_node("Split", ["x", constant("parts", [c, c, c])], ["q", "k", "v"], axis=-1),
        helper.make_node("Sum", ["q", "k", "v"], ["y"])]


def _sigmoid_chain(op: str, s, weight, constant) -> Graph:
    names = ["x", *(f"s{i}" for i in range(s["n"] - 1)), "y"]
    return [_image(s)], [helper.make_node("Sigmoid", [a], [b]) for a, b in zip(names, names[1:])]


def _mixed_chain(op: str, s, weight, constant) -> Graph:
    """Conv → PRelu or HardSwish → Conv, same channels throughout."""
    c, k = s["c"], s["k"]

    def conv(x: str, y: str, name: str) -> onnx.NodeProto:
        return helper.make_node("Conv", [x, weight(f"{name}w", [c, c, k, k]), weight(f"{name}b", [c])], [y],
                                kernel_shape=[k, k], pads=[(k - 1) // 2] * 4)
    act = (helper.make_node("PRelu", ["t", weight("slope", [c, 1, 1])], ["a"]) if s["act"] == 0
           else helper.make_node("HardSwish", ["t"], ["a"]))
    return [_image(s)], [conv("x", "t", "c1"), act, conv("a", "y", "c2")]


def _batch_matmul(op: str, s, weight, constant) -> Graph:
    return [("x", [s["batch"], s["rows"], s["c"]]), ("x2", [s["batch"], s["c"], s["cout"]])], [
        helper.make_node("MatMul", ["x", "x2"], ["y"])]


def _transpose(op: str, s, weight, constant) -> Graph:
    """Attention's head split: (1, tokens, heads, features) → (1, heads, tokens, features)."""
    return [("x", [1, s["rows"], s["batch"], s["c"]])], [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 1, 3])]


# ONNX operator sampled → how its graph is made (default: the operator on one image).
_GRAPHS: dict[str, Callable[..., Graph]] = {
    "Conv": _conv, "PointwiseConv": _conv, "MixedChain": _mixed_chain, "DepthwiseConv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MaxPool": _pool,
    "AveragePool": _pool, "Add": _binary, "Mul": _binary, "Sub": _binary, "Concat": _binary, "PRelu": _prelu,
    "Resize": _resize, "Pad": _pad, "Slice": _slice, "Softmax": _softmax, "LayerNormalization": _layer_norm,
    "Gelu": _gelu, "Split": _split, "MatMul": _batch_matmul, "Transpose": _transpose, "SigmoidChain": _sigmoid_chain,
}
