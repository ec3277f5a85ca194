"""Intermediate activations of a float model on calibration data.

Data-aware passes (bias correction, reconstruction after pruning, data-aware factorization)
need what flows into and out of particular layers on real samples. They get it by running a
copy of the model, in ONNX Runtime with graph optimizations off, with those tensors as its
outputs and only the nodes they need; the model itself is never changed.
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
    workers = max(min(len(batches), os.cpu_count() or 1), 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # single-threaded sessions, one per core
        for start in range(0, len(batches), workers):  # a chunk at a time: memory stays bounded
            chunk = batches[start:start + workers]
            for batch, outputs in zip(chunk, pool.map(runner.run, chunk)):
                everything = {**batch, **outputs}
                yield {name: everything[name] for name in wanted}


def capture(model: ir.Model, values: Iterable[ir.Value], batches: Sequence[Sample]) -> dict[str, np.ndarray]:
    """``values`` over all ``batches``, concatenated along the batch axis (axis 0)."""
    collected: dict[str, list[np.ndarray]] = {}
    for arrays in activations(model, values, batches):
        for name, array in arrays.items():
            collected.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in collected.items()}


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
