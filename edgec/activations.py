"""Intermediate activations of a float model on calibration data.

Data-aware passes (bias correction, reconstruction after pruning, data-aware factorization)
need what flows into and out of particular layers on real samples. They get it by running a
copy of the model, in ONNX Runtime with graph optimizations off, with those tensors as its
outputs and only the nodes they need; the model itself is never changed. A pass that changes
layers one after another and needs each layer's input after the changes before it walks the
model instead (:class:`Walk`), running each node once.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from edgec.model import to_proto
from edgec.runtime.ort import OrtRunner
from edgec.verify import Sample


def activations(model: ir.Model, values: Iterable[ir.Value], batches: Sequence[Sample]) -> Iterator[dict[str, np.ndarray]]:
    """For each batch, the arrays of ``values`` (graph inputs, outputs or any intermediate
    tensor), keyed by value name."""
    wanted = {value.name: value for value in values}
    runner = OrtRunner(_exposing(model, wanted.values()), optimization="disabled")
    for batch, outputs in zip(batches, _run_on_cores(runner, batches)):
        everything = {**batch, **outputs}
        yield {name: everything[name] for name in wanted}


def _run_on_cores(runner: OrtRunner, feeds: Sequence[Sample]) -> Iterator[dict[str, np.ndarray]]:
    """``runner``'s outputs for each of ``feeds``, in order: single-threaded sessions, one
    per core, a chunk of feeds at a time so memory stays bounded."""
    workers = max(min(len(feeds), os.cpu_count() or 1), 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(feeds), workers):
            yield from pool.map(runner.run, feeds[start:start + workers])


def capture(model: ir.Model, values: Iterable[ir.Value], batches: Sequence[Sample]) -> dict[str, np.ndarray]:
    """``values`` over all ``batches``, concatenated along the batch axis (axis 0)."""
    collected: dict[str, list[np.ndarray]] = {}
    for arrays in activations(model, values, batches):
        for name, array in arrays.items():
            collected.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in collected.items()}


class Walk:
    """The inputs of ``stops`` (nodes of ``model``, asked for in graph order) on ``batches``,
    each taken after the changes made to the stops before it.

    The model runs forward a stretch of nodes at a time, from the last stop to the next one,
    keeping per batch only the tensors later nodes still read. Capturing each stop's input
    with :func:`capture` instead re-runs the model from its inputs for every stop: pruning
    DenseNet-121 re-fits 120 layers, so each early node ran 120 times per batch.
    """

    def __init__(self, model: ir.Model, batches: Sequence[Sample], stops: Sequence[ir.Node]):
        self._model = model
        self._position = {node: index for index, node in enumerate(model.graph)}
        needed = _ancestors(stops)
        self._nodes = [node for node in model.graph if node in needed]
        self._last_read: dict[str, int] = {}
        for node in sorted({*self._nodes, *stops}, key=self._position.get):
            self._last_read.update((v.name, self._position[node]) for v in _reads(node))
        self._live = [{k: a for k, a in batch.items() if k in self._last_read} for batch in batches]
        self._at = 0

    def input_of(self, stop: ir.Node) -> np.ndarray:
        """``stop``'s first input over all batches, concatenated along axis 0."""
        end = self._position[stop]
        if end < self._at:
            raise ValueError(f"node '{stop.name}' comes before the walk's position: ask in graph order")
        stretch = [node for node in self._nodes if self._at <= self._position[node] < end]
        if stretch:
            self._run(stretch, end)
        self._at = end
        return np.concatenate([live[stop.inputs[0].name] for live in self._live])

    def _run(self, stretch: list[ir.Node], end: int) -> None:
        """Run ``stretch`` on every batch; keep what is read at ``end`` or later."""
        kept = [v for node in stretch for v in node.outputs if self._last_read.get(v.name, -1) >= end]
        model, fed = _stretch_model(self._model, stretch, kept, self._live[0])
        runner = OrtRunner(model, optimization="disabled")
        feeds = [{name: live[name] for name in fed} for live in self._live]
        for live, outputs in zip(self._live, _run_on_cores(runner, feeds)):
            live.update(outputs)
            for name in [name for name in live if self._last_read[name] < end]:
                del live[name]


def _stretch_model(model: ir.Model, nodes: list[ir.Node], kept: list[ir.Value], arrays: Sample) -> tuple[bytes, list[str]]:
    """``nodes`` of ``model`` as a model of their own, with ``kept`` as its outputs, and the
    names of its inputs: what the nodes read from outside that ``arrays`` holds (typed like
    those arrays). Whatever else they read from outside is a constant of the model."""
    produced = {value for node in nodes for value in node.outputs}
    outside = [v for v in dict.fromkeys(v for node in nodes for v in _reads(node)) if v not in produced]
    fed = [v.name for v in outside if v.name in arrays]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes], "stretch",
        [_declared(name, arrays[name]) for name in fed],
        [onnx.ValueInfoProto(name=v.name) for v in kept],  # ONNX Runtime infers their types
        [_named_tensor(v) for v in outside if v.name not in arrays],
    )
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    return proto.SerializeToString(), fed


def _declared(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """An input typed like ``array``, of its rank, every dimension free (batches differ)."""
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), [None] * array.ndim)


def _named_tensor(value: ir.Value) -> onnx.TensorProto:
    if value.const_value is None:
        raise ValueError(f"'{value.name}' is read but neither computed, fed nor constant")
    tensor = ir.serde.serialize_tensor(value.const_value)
    tensor.name = value.name
    return tensor


def _reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads: its inputs and the outer values its subgraphs read."""
    reads = [v for v in node.inputs if v is not None]
    for attribute in node.attributes.values():
        for subgraph in _subgraphs(attribute):
            for inner in ir.traversal.RecursiveGraphIterator(subgraph):
                reads += [v for v in inner.inputs if v is not None and v.graph is node.graph]
            reads += [v for v in subgraph.outputs if v.graph is node.graph]
    return reads


def _subgraphs(attribute: ir.Attr) -> list[ir.Graph]:
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    return list(attribute.value) if attribute.type == ir.AttributeType.GRAPHS else []


def _ancestors(stops: Sequence[ir.Node]) -> set[ir.Node]:
    """The nodes whose outputs the inputs of ``stops`` depend on."""
    found: set[ir.Node] = set()
    stack = [v for node in stops for v in _reads(node)]
    while stack:
        producer = stack.pop().producer()
        if producer is not None and producer not in found:
            found.add(producer)
            stack.extend(_reads(producer))
    return found


def _exposing(model: ir.Model, values: Iterable[ir.Value]) -> bytes:
    """The model with ``values`` (all but graph inputs) as its outputs and only the nodes they
    need: ONNX Runtime runs every node whatever outputs are asked for, and pruning's layer by
    layer re-fit asks for each layer's input in turn."""
    proto = to_proto(model)
    inputs = {v.name for v in model.graph.inputs}
    wanted = {v.name: v for v in values if v.name not in inputs} or {v.name: v for v in model.graph.outputs}
    declared = {o.name: o for o in proto.graph.output}
    outputs = [declared.get(name) or onnx.helper.make_tensor_value_info(name, value.dtype, None) for name, value in wanted.items()]
    proto.graph.ClearField("output")
    proto.graph.output.extend(outputs)
    if not _has_subgraphs(proto.graph):  # a subgraph may read any outer value: keep everything then
        _drop_unneeded(proto.graph)
    return proto.SerializeToString()


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for node in graph.node for a in node.attribute)


def _drop_unneeded(graph: onnx.GraphProto) -> None:
    """Remove the nodes and initializers no graph output depends on."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    needed, seen, stack = set(), set(), [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in producer and producer[name] not in needed:
            needed.add(producer[name])
            stack.extend(i for i in graph.node[producer[name]].input if i)
    nodes = [node for index, node in enumerate(graph.node) if index in needed]
    initializers = [t for t in graph.initializer if t.name in seen]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
