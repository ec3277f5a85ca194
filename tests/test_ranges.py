"""Error-minimizing int8 activation ranges (edgec.ranges) and their TFLite form."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from helpers import GraphBuilder

from edgec.build import canonicalize
from edgec.lower.tflite import _convert
from edgec.lower.tflite.convert import quantize_calibrated
from edgec.ranges import Histogram
from edgec.targets import load_target
from ai_edge_litert import schema_py_generated as tfl_schema


def _fake_quant(x: np.ndarray, low: float, high: float) -> np.ndarray:
    step = (high - low) / 255
    return np.clip(np.round((x - low) / step), 0, 255) * step + low


def test_least_error_range_beats_min_max_on_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20_000), [12.0, -10.0]])  # two outliers stretch min/max 3x
    histogram = Histogram(x.min(), x.max())
    histogram.add(x)
    low, high = histogram.best_range()
    assert x.min() < low < 0 < high < x.max()
    error = lambda lo, hi: np.mean((_fake_quant(x, lo, hi) - x) ** 2)  # noqa: E731
    assert error(low, high) < error(x.min(), x.max())
    fractions = np.linspace(0.1, 1.0, 19)
    best = min(error(x.min() * a, x.max() * b) for a in fractions for b in fractions)  # measured, not estimated
    assert error(low, high) < 1.1 * best


def test_exact_zeros_cost_nothing():
    """A ReLU output that is mostly zero: the zeros must not pull the range in."""
    x = np.concatenate([np.zeros(100_000), np.linspace(0.01, 1.0, 1000)])
    histogram = Histogram(0.0, 1.0)
    histogram.add(x)
    assert histogram.best_range() == (0.0, 1.0)


def _concat_model() -> ir.Model:
    """Two branches of very different ranges (×1 and ×30) concatenated, then a conv."""
    g = GraphBuilder(seed=1)
    a = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1])])
    b = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3, scale=9.0)], pads=[1, 1, 1, 1])])
    c = g.op("Concat", [a, b], axis=1)
    y = g.op("Conv", [c, g.weight(2, 8, 1, 1)])
    return canonicalize(ir.serde.deserialize_model(g.model({"x": (1, 3, 8, 8)}, {y: None})), {})[0]


def test_tflite_concat_inputs_and_output_share_one_chosen_range():
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    converted = _convert(_concat_model(), load_target("tflite-x86"), "int8", samples, "mse")
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(converted.content), 0)
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    concat = next(op for op in graph.operators if codes[op.opcodeIndex] == tfl_schema.BuiltinOperator.CONCATENATION)
    ranges = {(float(graph.tensors[i].quantization.min[0]), float(graph.tensors[i].quantization.max[0]))
              for i in [*concat.inputs, *concat.outputs]}
    assert len(ranges) == 1
    assert converted.records[-1].details["groups"] >= 1
    quantize_calibrated(converted.content, "tflite-x86")  # the converter's quantizer accepts the edited ranges
