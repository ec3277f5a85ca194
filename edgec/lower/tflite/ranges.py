"""Error-minimizing activation ranges for TFLite's int8, written into the calibrated model.

TensorFlow's converter calibrates by recording each tensor's min and max into the float
model's quantization fields (``_experimental_calibrate_only``); its quantizer then derives
every scale from those. edgec replaces them with the ranges of least squared error
(``edgec.ranges``) before quantizing, so the converter's own quantizer does the rest.

Tensors that TFLite's quantizer forces onto one scale (the inputs and output of a
concatenation, max-pool, reshape...: it gives them all the output's scale, so a producer
feeding a concatenation is quantized at the concatenation's range) form a group; a group
gets one range, chosen over the values of all its tensors together. Groups holding a graph
output keep min/max: a clipped output is wrong exactly where real data goes beyond the
calibration samples (the reason ONNX Runtime builds keep their output layers float).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert import schema_py_generated as tfl_schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edgec.lower.tflite.flatbuffer import builtin_codes, packed
from edgec.lower.tflite.keras_builder import KerasLowering
from edgec.quiet import captured_stderr
from edgec.ranges import Histogram

# Ops whose int8 kernels require input and output on the same scale (TFLite's
# SameOperandsAndResultsScale trait): their activation tensors share one range.
SAME_SCALE_OPS = frozenset({
    "CONCATENATION", "MAX_POOL_2D", "RESHAPE", "SQUEEZE", "TRANSPOSE", "PAD", "PADV2", "SLICE", "STRIDED_SLICE",
    "SPLIT", "SPLIT_V", "PACK", "UNPACK", "GATHER", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "DEPTH_TO_SPACE",
    "SPACE_TO_DEPTH", "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND", "MAXIMUM", "MINIMUM",
})
_NAMES = {v: k for k, v in vars(tfl_schema.BuiltinOperator).items() if not k.startswith("_")}


def refine_ranges(calibrated: bytes, samples: Sequence[Mapping[str, np.ndarray]]) -> tuple[bytes, dict]:
    """The calibrated model with each group's min/max replaced by its least-error range over
    ``samples`` (signature input name → array), and a record: groups refined and the mean
    fraction of the min/max range they kept."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    groups = [group for group in _groups(model) if not set(group) & set(graph.outputs)]
    histograms = _histograms(calibrated, graph, groups, samples)
    kept = []
    for group, histogram in zip(groups, histograms, strict=True):
        low, high = histogram.best_range()
        kept.append((high - low) / (histogram.high - histogram.low) if histogram.high > histogram.low else 1.0)
        for index in group:
            graph.tensors[index].quantization.min = np.array([low], np.float32)
            graph.tensors[index].quantization.max = np.array([high], np.float32)
    return packed(model, len(calibrated)), {"groups": len(groups), "mean_range_kept": round(float(np.mean(kept)), 4) if kept else 1.0}


MATCH_TOLERANCE = 1e-3  # of a tensor's largest magnitude: TFLite's float kernels and folded constants round differently


def learned_ranges(calibrated: bytes, ranges: Sequence[tuple[str, float, float]], lowering: KerasLowering,
                   sample: list[np.ndarray]) -> tuple[bytes, dict]:
    """The calibrated model with ``ranges`` (ONNX value name, low, high: those quantization-aware
    training learned) in place of min/max on the tensors holding those values, and a record.

    Tensors are found by value, not by name (the converter fuses several layers into one op
    and names its tensor after all of them): ``lowering``'s Keras tensor of each ONNX value and
    every calibrated TFLite tensor are computed on one ``sample`` (Keras-ordered inputs), and a
    TFLite tensor holds a value when its shape and numbers match. A same-scale group (see the
    module) takes the union of its members' learned ranges; groups holding a graph output
    keep min/max, as ``refine_ranges`` does."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    named = [(name, low, high) for name, low, high in ranges if name in lowering.tensors]
    probe = keras.Model(lowering.model.inputs, [lowering.tensors[name] for name, _, _ in named])
    values = [np.asarray(v) for v in tf.nest.flatten(probe(sample, training=False))] if named else []
    interpreter, run = _float_interpreter(calibrated)
    run(**dict(zip(lowering.model.input_names, sample)))
    tensors = {i: interpreter.get_tensor(i) for i, tensor in enumerate(graph.tensors) if _calibrated(tensor)}
    found: dict[int, tuple[float, float]] = {}
    matched = 0
    for (_, low, high), value in zip(named, values):
        holding = [i for i, tensor in tensors.items() if tensor.shape == value.shape
                   and np.max(np.abs(tensor - value), initial=0.0) <= MATCH_TOLERANCE * (np.max(np.abs(value), initial=0.0) + 1e-6)]
        matched += bool(holding)
        for i in holding:
            known = found.get(i, (low, high))
            found[i] = (min(known[0], low), max(known[1], high))
    groups = [g for g in _groups(model) if set(g) & set(found) and not set(g) & set(graph.outputs)]
    for group in groups:
        low, high = min(found[i][0] for i in group if i in found), max(found[i][1] for i in group if i in found)
        for index in group:
            graph.tensors[index].quantization.min = np.array([low], np.float32)
            graph.tensors[index].quantization.max = np.array([high], np.float32)
    return packed(model, len(calibrated)), {"source": "quantization-aware training", "given": len(ranges), "matched": matched,
                                     "tensors": sum(len(g) for g in groups)}


def _float_interpreter(calibrated: bytes):
    """The calibrated (float) model in LiteRT's reference kernels, every tensor kept, and its signature runner."""
    with captured_stderr():
        interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return interpreter, interpreter.get_signature_runner()


# Beyond this a value stands for infinity: the converter writes a mask's -inf as float32's
# lowest number, and calibration records that as the tensor's minimum.
UNBOUNDED = 1e30


def unbounded_ops(calibrated: bytes) -> set[str]:
    """The ops (by ``op_names``' name: their first output) reading or writing a float tensor
    that reaches infinity (``UNBOUNDED``): a constant holding -inf (an attention mask), or a
    calibrated range through it. Quantized, it gets a scale of ~1e36, and LiteRT's XNNPACK
    delegate aborted the process loading the model (ONNX's causal Attention tests); those
    ops stay float."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    graph = model.subgraphs[0]
    unbounded = {i for i, tensor in enumerate(graph.tensors) if _reaches_infinity(tensor, model.buffers[tensor.buffer].data)}
    return {graph.tensors[op.outputs[0]].name.decode() for op in graph.operators or []
            if unbounded & {*(op.inputs if op.inputs is not None else []), *op.outputs}}


def _reaches_infinity(tensor, data) -> bool:
    """Whether a float tensor's constant values, or its calibrated range, reach ``UNBOUNDED``."""
    if tensor.type != tfl_schema.TensorType.FLOAT32:
        return False
    if data is not None and len(data):
        values = np.frombuffer(bytes(data), np.float32)
    elif _calibrated(tensor):
        values = np.array([tensor.quantization.min[0], tensor.quantization.max[0]], np.float32)
    else:
        return False
    return bool(np.any(~np.isfinite(values) | (np.abs(values) >= UNBOUNDED)))


def _calibrated(tensor) -> bool:
    q = tensor.quantization
    return q is not None and q.min is not None and len(q.min) == 1 and tensor.type == tfl_schema.TensorType.FLOAT32


def _groups(model) -> list[list[int]]:
    """Calibrated tensors, joined into one group across each same-scale op (union-find)."""
    graph = model.subgraphs[0]
    parent = {i: i for i, tensor in enumerate(graph.tensors) if _calibrated(tensor)}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    codes = builtin_codes(model)
    for op in graph.operators or []:
        if _NAMES.get(codes[op.opcodeIndex]) in SAME_SCALE_OPS:
            tensors = [i for i in [*op.inputs, *op.outputs] if i in parent]
            for other in tensors[1:]:
                parent[root(other)] = root(tensors[0])
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def _histograms(calibrated: bytes, graph, groups: list[list[int]], samples) -> list[Histogram]:
    """Per group, one histogram of all its tensors' values over the float model's runs."""
    per_tensor = {i: Histogram(graph.tensors[i].quantization.min[0], graph.tensors[i].quantization.max[0]) for g in groups for i in g}
    interpreter, run = _float_interpreter(calibrated)
    for sample in samples:
        run(**sample)
        for i, histogram in per_tensor.items():
            histogram.add(interpreter.get_tensor(i))
    merged = []
    for group in groups:
        histogram = per_tensor[group[0]]
        for i in group[1:]:
            histogram = histogram.merge(per_tensor[i])
        merged.append(histogram)
    return merged
