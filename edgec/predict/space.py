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


def _spatial(rng: np.random.Generator) -> dict[str, int]:
    return {"h": _log_int(rng, 2, 112), "c": _log_int(rng, 4, 512)}


def _conv(rng: np.random.Generator) -> dict[str, int]:
    spatial = _spatial(rng)  # output channels within 4x of the input's, as networks have them
    return {**spatial, "cout": max(4, min(512, int(spatial["c"] * 2 ** rng.uniform(-2, 2)))), "k": int(rng.choice([1, 1, 3, 3, 5, 7])),
            "stride": int(rng.choice([1, 1, 2]))}


def _depthwise(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "k": int(rng.choice([3, 3, 5])), "stride": int(rng.choice([1, 2]))}


def _fc(rng: np.random.Generator) -> dict[str, int]:
    return {"rows": int(rng.choice([1, 1, _log_int(rng, 2, 256)])), "c": _log_int(rng, 8, 2048), "cout": _log_int(rng, 8, 2048)}


def _pool(rng: np.random.Generator) -> dict[str, int]:
    sizes = {**_spatial(rng), "k": int(rng.choice([2, 3])), "stride": int(rng.choice([1, 2, 2]))}
    return {**sizes, "h": max(sizes["h"], sizes["k"])}


def _binary(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "broadcast": int(rng.random() < 0.4)}


def _concat(rng: np.random.Generator) -> dict[str, int]:
    return {**_spatial(rng), "c2": _log_int(rng, 4, 512)}


# ONNX operator sampled → how its sizes are drawn.
SIZES: dict[str, Callable[[np.random.Generator], dict[str, int]]] = {
    "Conv": _conv, "DepthwiseConv": _depthwise, "Gemm": _fc, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _spatial, "Add": _binary, "Mul": _binary, "Concat": _concat,
    "HardSwish": _spatial, "Sigmoid": _spatial, "Relu": _spatial,
}


def draw(op: str, precision: str, rng: np.random.Generator) -> Sample:
    """A configuration of ``op`` no larger than ``MAX_MACS``."""
    while True:
        sizes = SIZES[op](rng)
        if _macs(op, sizes) <= MAX_MACS:
            return Sample(op, precision, sizes)


def _macs(op: str, s: dict[str, int]) -> float:
    if op == "Conv":
        return (s["h"] / s["stride"]) ** 2 * s["c"] * s["cout"] * s["k"] ** 2
    if op == "Gemm":
        return s["rows"] * s["c"] * s["cout"]
    return s["h"] ** 2 * s["c"] * s.get("k", 1) ** 2


def to_onnx(sample: Sample) -> onnx.ModelProto:
    """The sample as a one-kernel ONNX model with seeded random weights."""
    s, rng = sample.sizes, np.random.default_rng(0)
    image = ("x", [1, s.get("c", 1), s.get("h", 1), s.get("h", 1)])
    weights: list[TensorProto] = []

    def weight(name: str, shape: list[int]) -> str:
        weights.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))
        return name

    op, inputs = sample.op, [image]
    if op in ("Conv", "DepthwiseConv"):
        groups, cout = (s["c"], s["c"]) if op == "DepthwiseConv" else (1, s["cout"])
        k = s["k"]
        nodes = [helper.make_node("Conv", ["x", weight("w", [cout, s["c"] // groups, k, k]), weight("b", [cout])], ["t"],
                                  kernel_shape=[k, k], strides=[s["stride"]] * 2, pads=[k // 2] * 4, group=groups),
                 helper.make_node("Relu", ["t"], ["y"])]
    elif op == "Gemm":
        inputs = [("x", [s["rows"], s["c"]])]
        nodes = [helper.make_node("Gemm", ["x", weight("w", [s["c"], s["cout"]]), weight("b", [s["cout"]])], ["y"])]
    elif op in ("MaxPool", "AveragePool"):
        nodes = [helper.make_node(op, ["x"], ["y"], kernel_shape=[s["k"]] * 2, strides=[s["stride"]] * 2)]
    elif op in ("Add", "Mul", "Concat"):
        other = [1, s["c2"], s["h"], s["h"]] if op == "Concat" else [1, s["c"], 1, 1] if s["broadcast"] else image[1]
        inputs = [image, ("x2", other)]
        nodes = [helper.make_node(op, ["x", "x2"], ["y"], **({"axis": 1} if op == "Concat" else {}))]
    else:
        nodes = [helper.make_node(op, ["x"], ["y"])]
    graph = helper.make_graph(nodes, f"{op}_kernel", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgec-calibrate")
    model.ir_version = 8
    return model
