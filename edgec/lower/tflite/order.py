"""One canonical form of a ``.tflite``: operators in a memory-lean order, everything numbered from it.

TensorFlow's converter emits operators, tensors and buffers in an order that follows the
graph it was given, so the same model exported twice with its ONNX nodes in a different
(valid) order became two different files. The order is not cosmetic: XNNPACK runs a delegate
partition's operators in the file's order and plans its activation arena from their live
ranges. On MediaPipe's face landmark model the converter ran each downsampling block's
depthwise conv and the 1x1 conv after it before the max pool that reads the block input,
keeping that input (the largest tensor of the block) alive across the 1x1 conv; measured here
that artifact was 9-15% slower than Google's own file with the same kernels.

``canonical`` rewrites the main file structure, never what is computed:

* operators: a topological order built greedily, each step taking the ready operator that
  adds the fewest activation bytes (outputs it allocates minus inputs it frees), ties broken
  by a hash of what the operator computes (op, options, and recursively its inputs; constants
  by content) — never by names or by the order the exporter chose;
* tensors by first use in that order (graph inputs first), buffers by first use, operator
  codes by first use;
* the output of a QUANTIZE or DEQUANTIZE named after its input (``<input>/quantize<k>``,
  ``<input>/dequantize<k>``, k counting such conversions of that input in operator order):
  the converter numbers those names in an order that varied between two runs on the same
  model (an int8 transformer came out with two pairs of names swapped), and the input's name
  already carries the layer it converts. Graph inputs and outputs keep their names.

A subgraph with resource variables or stateful tensors keeps the converter's operator order
(only its numbering changes): there the order carries meaning data dependencies do not show.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from ai_edge_litert import schema_py_generated as tfl_schema

from edgec.lower.tflite.flatbuffer import builtin_codes, packed

_ITEM_BYTES = {"FLOAT16": 2, "INT16": 2, "UINT16": 2, "BFLOAT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1,
               "INT64": 8, "UINT64": 8, "FLOAT64": 8, "COMPLEX64": 8, "COMPLEX128": 16, "INT4": 1}
_TYPE_NAMES = {v: k for k, v in vars(tfl_schema.TensorType).items() if not k.startswith("_")}
_BUILTIN_NAMES = {v: k for k, v in vars(tfl_schema.BuiltinOperator).items() if not k.startswith("_")}
_STATEFUL_OPS = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE", "HASHTABLE", "HASHTABLE_FIND",
                 "HASHTABLE_IMPORT", "HASHTABLE_SIZE"}


def canonical(content: bytes) -> bytes:
    """``content`` with its operators, tensors, buffers and operator codes in canonical order."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    for index, graph in enumerate(model.subgraphs):
        if not _has_side_effects(model, graph):
            keys = _GraphKeys(model, graph)
            graph.operators = [graph.operators[i] for i in lean_order(graph, keys.operator, lambda t: _activation_bytes(model, graph, t))]
        _renumber_tensors(model, graph, index)
        _name_conversions(model, graph)
    _renumber_buffers(model)
    _renumber_operator_codes(model)
    return packed(model, len(content))


def lean_order(graph, key: Callable[[int], str], size: Callable[[int], int]) -> list[int]:
    """Operator indices in a topological order that keeps few activation bytes alive: at each
    step the ready operator with the smallest (bytes its outputs add − bytes of the inputs it
    is the last reader of, ``key``). Graph inputs and outputs are never freed."""
    producer = {int(t): i for i, op in enumerate(graph.operators) for t in op.outputs}
    pinned = {int(t) for t in [*graph.inputs, *graph.outputs]}
    readers: dict[int, int] = {}
    waiting = []
    for op in graph.operators:
        inputs = {int(t) for t in op.inputs if t in producer}
        waiting.append(len({producer[t] for t in inputs}))
        for t in inputs:
            readers[t] = readers.get(t, 0) + 1
    consumers: dict[int, set[int]] = {}
    for i, op in enumerate(graph.operators):
        for t in op.inputs:
            if t in producer:
                consumers.setdefault(producer[int(t)], set()).add(i)

    def cost(i: int) -> tuple[int, str]:
        op = graph.operators[i]
        freed = sum(size(t) for t in {int(t) for t in op.inputs if t in producer} if t not in pinned and readers[t] == 1)
        return sum(size(int(t)) for t in op.outputs if t >= 0) - freed, key(i)

    ready = {i for i, count in enumerate(waiting) if count == 0}
    order = []
    while ready:
        chosen = min(ready, key=cost)
        ready.remove(chosen)
        order.append(chosen)
        for t in {int(t) for t in graph.operators[chosen].inputs if t in producer}:
            readers[t] -= 1
        for j in consumers.get(chosen, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.add(j)
    return order


class _GraphKeys:
    """A hash per operator of what it computes: op code, options, and (recursively) its
    inputs — graph inputs by position, constants by content, never tensor names."""

    def __init__(self, model, graph):
        self.model, self.graph = model, graph
        self.producer = {int(t): (i, k) for i, op in enumerate(graph.operators) for k, t in enumerate(op.outputs)}
        self.inputs = {int(t): k for k, t in enumerate(graph.inputs)}
        self.keys: dict[int, str] = {}
        for i in range(len(graph.operators)):  # in the converter's (topological) order: shallow recursion
            self.operator(i)

    def operator(self, index: int) -> str:
        if index not in self.keys:
            op = self.graph.operators[index]
            code = self.model.operatorCodes[op.opcodeIndex]
            parts = [str(max(code.builtinCode, code.deprecatedBuiltinCode)), str(code.customCode), str(code.version),
                     _describe(op.builtinOptions), _describe(op.builtinOptions2), bytes(op.customOptions if op.customOptions is not None else b"").hex()]
            parts += [self._value(int(t)) for t in op.inputs]
            self.keys[index] = _digest("|".join(parts).encode())
        return self.keys[index]

    def _value(self, tensor: int) -> str:
        if tensor < 0:
            return "-"
        if tensor in self.producer:
            index, k = self.producer[tensor]
            return f"{self.operator(index)}:{k}"
        if tensor in self.inputs:
            return f"in:{self.inputs[tensor]}"
        t = self.graph.tensors[tensor]
        data = self.model.buffers[t.buffer].data if t.buffer else None
        return "const:" + _digest(b"".join([_describe(t.shape).encode(), bytes([t.type]), _describe(t.quantization).encode(),
                                            bytes(data if data is not None else b"")]))


def _has_side_effects(model, graph) -> bool:
    """Whether the order of ``graph``'s operators means more than their data dependencies:
    resource variables and stateful (variable) tensors are read and written in file order."""
    codes = builtin_codes(model)
    stateful = any(_BUILTIN_NAMES.get(codes[op.opcodeIndex]) in _STATEFUL_OPS for op in graph.operators)
    return stateful or any(t.isVariable for t in graph.tensors)


def _describe(obj) -> str:
    """A stable text form of a flatbuffers object-API value (options, quantization, shapes)."""
    if obj is None or isinstance(obj, (int, float, str, bytes, bool)):
        return repr(obj)
    if isinstance(obj, np.ndarray):
        return repr(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_describe(v) for v in obj) + "]"
    return type(obj).__name__ + "{" + ",".join(f"{k}={_describe(v)}" for k, v in sorted(vars(obj).items())) + "}"


def _activation_bytes(model, graph, tensor: int) -> int:
    t = graph.tensors[tensor]
    if t.buffer and model.buffers[t.buffer].data is not None:
        return 0
    count = int(np.prod(t.shape)) if t.shape is not None else 1
    return count * _ITEM_BYTES.get(_TYPE_NAMES.get(t.type, ""), 4)


def _name_conversions(model, graph) -> None:
    """Each conversion's output named after its input (see the module docstring)."""
    codes = [_BUILTIN_NAMES.get(code) for code in builtin_codes(model)]
    pinned = {int(t) for t in [*graph.inputs, *graph.outputs]}
    seen: dict[tuple[int, str], int] = {}
    for op in graph.operators:
        kind = codes[op.opcodeIndex]
        if kind not in ("QUANTIZE", "DEQUANTIZE") or int(op.outputs[0]) in pinned:
            continue
        source = int(op.inputs[0])
        k = seen[source, kind] = seen.get((source, kind), -1) + 1
        graph.tensors[int(op.outputs[0])].name = f"{graph.tensors[source].name.decode()}/{kind.lower()}{k}".encode()


def _renumber_tensors(model, graph, index: int) -> None:
    """Tensors by first use: graph inputs, then each operator's inputs and outputs in order."""
    order = list(dict.fromkeys([int(t) for t in graph.inputs] + [int(t) for op in graph.operators for t in (*op.inputs, *op.outputs)]
                               + [int(t) for t in graph.outputs] + list(range(len(graph.tensors)))))
    order.remove(-1) if -1 in order else None
    new = {old: i for i, old in enumerate(order)}
    remap = lambda ids: None if ids is None else np.array([new[int(t)] if t >= 0 else -1 for t in ids], dtype=np.int32)  # noqa: E731
    graph.tensors = [graph.tensors[old] for old in order]
    for op in graph.operators:
        op.inputs, op.outputs, op.intermediates = remap(op.inputs), remap(op.outputs), remap(op.intermediates)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == index:
            for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
                entry.tensorIndex = new[entry.tensorIndex]


def _renumber_buffers(model) -> None:
    """Buffers by first use (tensors of each subgraph, then metadata); buffer 0 stays the empty one."""
    used = [t.buffer for graph in model.subgraphs for t in graph.tensors] + [m.buffer for m in model.metadata or []]
    order = list(dict.fromkeys([0, *used, *range(len(model.buffers))]))
    new = {old: i for i, old in enumerate(order)}
    model.buffers = [model.buffers[old] for old in order]
    for graph in model.subgraphs:
        for t in graph.tensors:
            t.buffer = new[t.buffer]
    for entry in model.metadata or []:
        entry.buffer = new[entry.buffer]


def _renumber_operator_codes(model) -> None:
    order = list(dict.fromkeys([op.opcodeIndex for g in model.subgraphs for op in g.operators] + list(range(len(model.operatorCodes)))))
    new = {old: i for i, old in enumerate(order)}
    model.operatorCodes = [model.operatorCodes[old] for old in order]
    for graph in model.subgraphs:
        for op in graph.operators:
            op.opcodeIndex = new[op.opcodeIndex]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
