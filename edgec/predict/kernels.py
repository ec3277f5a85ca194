"""The kernels a ``.tflite`` runs as, after XNNPACK's fusions: what latency is predicted per.

nn-Meter's observation: a runtime executes a model as a sequence of *kernels* (operators
after its fusions), and a model's latency is close to the sum of its kernels' latencies.
With XNNPACK, a TFLite CONV_2D carries its bias and activation (one kernel); a zero PAD
feeding a convolution is folded into it; reshapes of static shapes cost nothing; a run of
unary ops from an int8 value to an int8 value (a float activation between two conversions)
is one table lookup (``LUT``). Every other
operator is a kernel of its own, described by the few numbers its cost depends on
(:class:`Kernel`). A kernel kind without a fitted regressor is *unknown*: reported, never
guessed. Besides its kernels, an inference costs the copies of its inputs and outputs
(:class:`Interface`), which grow with their sizes.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as tfl

from edgec.errors import ModelLoadError

_BUILTIN_NAMES = {v: k for k, v in vars(tfl.BuiltinOperator).items() if not k.startswith("_")}
# Operators XNNPACK runs as no kernel of their own: static reshapes (a view of the same buffer).
FREE = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS"}
# A zero PAD whose only reader is one of these is folded into it by XNNPACK.
PAD_FOLDS_INTO = {"CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "AVERAGE_POOL_2D"}
# A clamp whose input only it reads is fused by XNNPACK into the op that computes that input.
CLAMPS = {"RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1"}
CLAMP_FUSES_INTO = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "DIV",
                    "MAX_POOL_2D", "AVERAGE_POOL_2D", "CUSTOM:Convolution2DTransposeBias"}
# Float ↔ int8 conversions: one kind, costed by the elements converted. A DEQUANTIZE of a
# constant (fp16 or int8 weights) is done once when the model loads, not per inference.
CONVERT = {"QUANTIZE": "CONVERT", "DEQUANTIZE": "CONVERT"}
# Kinds that run as another's kernel: MediaPipe's transposed convolution is XNNPACK's deconvolution.
SAME_KERNEL = {**CONVERT, "CUSTOM:Convolution2DTransposeBias": "TRANSPOSE_CONV"}
CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")
# XNNPACK's unary elementwise operators (QUANTIZE and DEQUANTIZE are its "convert"), and the
# binary ones, which count as unary when one operand is a constant single value.
UNARY = {"QUANTIZE", "DEQUANTIZE", *CLAMPS, "HARD_SWISH", "LOGISTIC", "TANH", "ELU", "LEAKY_RELU", "GELU", "ABS", "NEG",
         "SQRT", "RSQRT", "SQUARE", "EXP", "LOG", "SIN", "COS", "CEIL", "FLOOR", "ROUND", "SIGN"}
SCALAR_BINARY = {"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE"}
LUT_MAX_OPS = 10  # XNN_MAX_UNARY_FUSION_NODES
_BYTE_TYPES = {tfl.TensorType.INT8, tfl.TensorType.UINT8}
FEATURES = ("hin", "win", "cin", "hout", "wout", "cout", "k", "stride", "in2", "macs")
# How kernels are read off a .tflite; each calibration sample records it, and one read by an
# older version is lowered again and read anew before a fit (calibrate.py).
DETECTOR = "2"  # 2: unary runs between int8 values are one LUT kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel: its kind (the TFLite builtin, e.g. ``CONV_2D``), precision, the shape
    numbers its cost depends on (``FEATURES``) and the operator it stands for."""

    kind: str
    precision: str
    shape: tuple[int, ...]
    operator: str

    @property
    def key(self) -> str:
        """Which regressor predicts it: kind and precision."""
        return f"{self.kind}/{self.precision}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "precision": self.precision, "operator": self.operator,
                **dict(zip(FEATURES, self.shape))}


@dataclasses.dataclass(frozen=True)
class Interface:
    """What an inference copies in and out: tensor count and bytes each way; and the bytes of
    weights it reads (fp16 ones as the fp32 the runtime expands them to at load)."""

    inputs: int
    outputs: int
    in_bytes: int
    out_bytes: int
    weight_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def detect(path: Path) -> list[Kernel]:
    """The kernels of the ``.tflite`` at ``path``, in execution order."""
    if path.suffix.lower() != ".tflite":
        raise ModelLoadError(f"'{path}' is not a .tflite file; edgec predicts the latency of TFLite artifacts.",
                             hint="Give a .tflite that `edgec build --target tflite-x86` or `tflite-arm` wrote.")
    try:
        return kernels_of(path.read_bytes())
    except (OSError, ValueError, IndexError, TypeError) as exc:  # flatbuffers raises plain errors on garbage
        raise ModelLoadError(f"'{path}' is not a readable .tflite: {exc}.",
                             hint="Give a complete .tflite flatbuffer that `edgec build` wrote.") from exc


def kernels_of(content: bytes) -> list[Kernel]:
    """The kernels of a ``.tflite`` flatbuffer, in execution order."""
    model = tfl.ModelT.InitFromPackedBuf(content, 0)
    codes = [_code_name(code) for code in model.operatorCodes]
    graph = model.subgraphs[0]
    readers: dict[int, list[int]] = {}
    for index, op in enumerate(graph.operators):
        for tensor in _inputs(op):
            readers.setdefault(tensor, []).append(index)
    producers = {int(t): index for index, op in enumerate(graph.operators) for t in op.outputs}
    outputs = {int(t) for t in graph.outputs}
    kernels = []
    chains = _lut_chains(model, graph, codes, readers, outputs)
    in_chain = {index for chain in chains.values() for index in chain}
    for index, op in enumerate(graph.operators):
        kind = codes[op.opcodeIndex]
        if index in chains:
            kernels.append(_kernel("LUT", model, graph, graph.operators[chains[index][-1]], index))
            continue
        if index in in_chain or kind in FREE or (kind == "PAD" and _folds(graph, op, readers, codes)):
            continue
        if kind == "DEQUANTIZE" and _constant(model, graph.tensors[_inputs(op)[0]]):
            continue
        if kind in CLAMPS and _fused_clamp(graph, op, readers, producers, outputs, codes):
            continue
        kernels.append(_kernel(SAME_KERNEL.get(kind, kind), model, graph, op, index))
    return kernels


def interface_of(content: bytes) -> Interface:
    """The inputs and outputs of a ``.tflite`` flatbuffer (what an inference copies) and its weights."""
    model = tfl.ModelT.InitFromPackedBuf(content, 0)
    graph = model.subgraphs[0]
    weights = [t for t in graph.tensors if model.buffers[t.buffer].data is not None and len(model.buffers[t.buffer].data)]
    weight_bytes = sum(int(np.prod(t.shape)) * (4 if t.type == tfl.TensorType.FLOAT16 else _ITEMSIZE.get(t.type, 4)) for t in weights)
    return Interface(len(graph.inputs), len(graph.outputs), _bytes(graph, graph.inputs), _bytes(graph, graph.outputs), weight_bytes)


def _bytes(graph, tensors) -> int:
    return sum(int(np.prod(graph.tensors[t].shape)) * _ITEMSIZE.get(graph.tensors[t].type, 4) for t in tensors)


_ITEMSIZE = {tfl.TensorType.INT8: 1, tfl.TensorType.UINT8: 1, tfl.TensorType.INT16: 2, tfl.TensorType.FLOAT16: 2,
             tfl.TensorType.BOOL: 1, tfl.TensorType.INT64: 8}


def _code_name(code) -> str:
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == tfl.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{code.customCode.decode()}"
    return _BUILTIN_NAMES[builtin]


def _inputs(op) -> list[int]:
    return [int(t) for t in (op.inputs if op.inputs is not None else []) if t >= 0]


def _folds(graph, pad, readers: dict[int, list[int]], codes: list[str]) -> bool:
    """A PAD read only by one convolution or pooling op (XNNPACK folds it in)."""
    users = readers.get(int(pad.outputs[0]), [])
    return len(users) == 1 and codes[graph.operators[users[0]].opcodeIndex] in PAD_FOLDS_INTO


def _lut_chains(model, graph, codes: list[str], readers: dict[int, list[int]], outputs: set[int]) -> dict[int, list[int]]:
    """Runs of two or more unary elementwise ops from an 8-bit tensor to an 8-bit tensor, each
    value between them read only by the next: XNNPACK computes such a run as one table
    lookup (``xnn_subgraph_fuse_unary_quantized_into_lut``), e.g. DEQUANTIZE → HARD_SWISH →
    QUANTIZE, or a chain of int8 sigmoids. Keyed by the first op's index."""
    chains: dict[int, list[int]] = {}
    claimed: set[int] = set()
    for index, op in enumerate(graph.operators):
        if index in claimed or not _unary(model, graph, op, codes) or graph.tensors[_inputs(op)[0]].type not in _BYTE_TYPES:
            continue
        chain = [index]
        while len(chain) < LUT_MAX_OPS:
            value = int(graph.operators[chain[-1]].outputs[0])
            users = readers.get(value, [])
            if value in outputs or len(users) != 1 or not _unary(model, graph, graph.operators[users[0]], codes):
                break
            chain.append(users[0])
        while len(chain) > 1 and graph.tensors[int(graph.operators[chain[-1]].outputs[0])].type not in _BYTE_TYPES:
            chain.pop()  # the run must end on an 8-bit value: a table's entries
        if len(chain) > 1:
            chains[index] = chain
            claimed.update(chain)
    return chains


def _unary(model, graph, op, codes: list[str]) -> bool:
    """An op XNNPACK takes for a pure function of one tensor (see ``_lut_chains``)."""
    kind = codes[op.opcodeIndex]
    if kind in UNARY:
        return len(_inputs(op)) == 1
    inputs = [graph.tensors[t] for t in _inputs(op)]
    return (kind in SCALAR_BINARY and len(inputs) == 2
            and any(_constant(model, t) and int(np.prod(t.shape)) == 1 for t in inputs))


def _fused_clamp(graph, clamp, readers: dict[int, list[int]], producers: dict[int, int], outputs: set[int],
                 codes: list[str]) -> bool:
    """A clamp on a value only it reads, computed by an op XNNPACK fuses clamps into."""
    source = _inputs(clamp)[0]
    producer = producers.get(source)
    return (producer is not None and source not in outputs and len(readers.get(source, [])) == 1
            and codes[graph.operators[producer].opcodeIndex] in CLAMP_FUSES_INTO)


def _kernel(kind: str, model, graph, op, index: int) -> Kernel:
    tensors = graph.tensors
    inputs = [tensors[t] for t in _inputs(op)]
    if kind == "TRANSPOSE_CONV" and inputs[0].type == tfl.TensorType.INT32:  # output shape, weights, input[, bias]
        inputs = [inputs[2], inputs[1], *inputs[3:]]
    output = tensors[int(op.outputs[0])]
    first = inputs[0] if inputs else output
    hin, win, cin = _hwc(first.shape)
    hout, wout, cout = _hwc(output.shape)
    options = op.builtinOptions
    stride = int(getattr(options, "strideH", 1) or 1)
    k = int(getattr(options, "filterHeight", 0) or 0)
    if kind in CONVOLUTIONS and len(inputs) > 1:
        k = int(inputs[1].shape[1])
    in2 = sum(int(np.prod(t.shape)) for t in inputs[1:] if not _constant(model, t))
    macs = _macs(kind, hout * wout * cout, cin, k, first.shape, inputs)
    precision = "int8" if _is_int8(inputs, output, kind) else "fp32"
    return Kernel(kind, precision, (hin, win, cin, hout, wout, cout, k, stride, in2, macs), _name(output, index))


def _constant(model, tensor) -> bool:
    buffer = model.buffers[tensor.buffer]
    return buffer.data is not None or bool(buffer.offset)


def _hwc(shape) -> tuple[int, int, int]:
    """Rows, columns and channels of an NHWC (or lower-rank) tensor; batch folded into rows."""
    dims = [int(d) for d in (shape if shape is not None else [])]
    if len(dims) >= 4:
        return math.prod(dims[:-2]), dims[-2], dims[-1]
    if len(dims) >= 2:
        return math.prod(dims[:-1]), 1, dims[-1]
    return 1, 1, dims[0] if dims else 1


def _macs(kind: str, out_elems: int, cin: int, k: int, in_shape, inputs) -> int:
    if kind == "CONV_2D":
        return out_elems * k * k * cin
    if kind == "TRANSPOSE_CONV":  # every input pixel scatters a k×k patch to every output channel
        return int(np.prod(in_shape)) * k * k * int(inputs[1].shape[0])
    if kind == "BATCH_MATMUL" and len(inputs) > 1:
        return out_elems * int(inputs[0].shape[-1])
    if kind == "DEPTHWISE_CONV_2D":
        return out_elems * k * k
    if kind == "FULLY_CONNECTED" and len(inputs) > 1:
        return out_elems * int(inputs[1].shape[-1])
    if kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
        return out_elems * max(k, 1) ** 2
    return max(out_elems, int(np.prod(in_shape)) if in_shape is not None else 0)


def _is_int8(inputs, output, kind: str) -> bool:
    if kind == "CONVERT":  # a conversion is int8 work whichever way it goes
        return True
    return any(t.type == tfl.TensorType.INT8 for t in [*inputs[:1], output])


def _name(tensor, index: int) -> str:
    return tensor.name.decode() if tensor.name else f"#{index}"
