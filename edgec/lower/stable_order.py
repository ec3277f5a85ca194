"""Make an ONNX Runtime-optimized graph byte-for-byte reproducible.

At level "all", ONNX Runtime's NCHWc layout transformer names the nodes and tensors it adds
(``ReorderOutput_token_63``...) and orders them differently from one session to the next
(measured: two builds of the same MobileNetV3 gave the same graph with its Reorder nodes
named and ordered differently). edgec promises byte-identical artifacts, so the saved graph
is rewritten into one canonical form: nodes in a topological order that depends only on what
each node computes, and every name ORT made up replaced by one derived from that order.
Names that came from the source model are kept, so profiles still name the user's layers.
A node depends on its named inputs and on the outer values its subgraphs read (an ``If``
branch returning a value of the main graph); an empty name is an omitted optional input or
output (an LSTM's unused ``sequence_lens`` and ``Y``), never a value.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

import onnx

from edgec.errors import InternalError


def canonical(model: onnx.ModelProto, source_names: Iterable[str]) -> onnx.ModelProto:
    """``model`` with canonical node order and names; ``source_names`` are kept as they are."""
    graph = model.graph
    keys = _node_keys(graph)
    order = _stable_topological_order(graph, keys)
    renames = _renames(graph, order, set(source_names))
    nodes = [graph.node[i] for i in order]
    for node in nodes:
        node.name = renames.get(("node", node.name), node.name) if node.name else node.name
        node.output[:] = [renames.get(("value", v), v) for v in node.output]
        _rename_inputs(node, renames)
    del graph.node[:]
    graph.node.extend(nodes)
    for entry in [*graph.initializer, *graph.value_info]:
        entry.name = renames.get(("value", entry.name), entry.name)
    _sort_unique(graph.initializer)
    _sort_unique(graph.value_info)
    return model


def _rename_inputs(node: onnx.NodeProto, renames: dict[tuple[str, str], str]) -> None:
    """Rename what ``node`` reads, inside its subgraphs too (ONNX names are unique across
    scopes, so a renamed outer value is never a subgraph's own)."""
    node.input[:] = [renames.get(("value", v), v) for v in node.input]
    for graph in _subgraphs(node):
        for inner in graph.node:
            _rename_inputs(inner, renames)
        for output in graph.output:
            output.name = renames.get(("value", output.name), output.name)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def _reads(node: onnx.NodeProto) -> list[str]:
    """The values ``node`` depends on: its named inputs and its subgraphs' outer reads."""
    return [v for v in node.input if v] + _outer_reads(node)


def _outer_reads(node: onnx.NodeProto) -> list[str]:
    """The values of enclosing graphs that ``node``'s subgraphs read, each once, in first-use order."""
    reads = []
    for graph in _subgraphs(node):
        inner = {i.name for i in [*graph.input, *graph.initializer]} | {o for n in graph.node for o in n.output}
        reads += [v for n in graph.node for v in _reads(n) if v not in inner]
        reads += [o.name for o in graph.output if o.name not in inner]
    return list(dict.fromkeys(reads))


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _sort_unique(entries) -> None:
    """By name, one entry per name (constants ORT duplicated now share a content name)."""
    by_name = {e.name: e for e in entries}
    ordered = [by_name[name] for name in sorted(by_name)]
    del entries[:]
    entries.extend(ordered)


def _node_keys(graph: onnx.GraphProto) -> list[str]:
    """A hash per node of what it computes: op, attributes and (recursively) its inputs —
    graph inputs by name, constants by content — never ORT's made-up names."""
    value_keys = {i.name: "in:" + i.name for i in graph.input}
    for init in graph.initializer:
        value_keys[init.name] = "const:" + _content_digest(init)
    producer = _producers(graph)
    keys: list[str | None] = [None] * len(graph.node)

    def key(index: int) -> str:
        if keys[index] == "":
            raise InternalError(f"ONNX Runtime's optimized graph has a cycle through node '{graph.node[index].name}'; "
                                "edgec cannot order it.")
        if keys[index] is None:
            keys[index] = ""  # being computed: meeting it again means a cycle
            node = graph.node[index]
            parts = [node.domain, node.op_type, *(a.SerializeToString().hex() for a in sorted(node.attribute, key=lambda a: a.name))]
            parts += [value(v) for v in [*node.input, *_outer_reads(node)]]
            keys[index] = _digest("|".join(parts).encode())
        return keys[index]

    def value(name: str) -> str:
        if name in value_keys or not name:
            return value_keys.get(name, "")
        index = producer[name]
        return f"{key(index)}:{list(graph.node[index].output).index(name)}"

    for i in range(len(graph.node)):  # in ORT's (topological) order, so recursion stays shallow
        key(i)
    return keys


def _stable_topological_order(graph: onnx.GraphProto, keys: list[str]) -> list[int]:
    """Kahn's algorithm, always taking the ready node with the smallest key."""
    producer = _producers(graph)
    reads = [_reads(node) for node in graph.node]
    waiting = [len({producer[v] for v in values if v in producer}) for values in reads]
    consumers: dict[int, set[int]] = {}
    for i, values in enumerate(reads):
        for v in values:
            if v in producer:
                consumers.setdefault(producer[v], set()).add(i)
    ready = [(keys[i], i) for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in consumers.get(i, ()):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (keys[j], j))
    return order


def _renames(graph: onnx.GraphProto, order: list[int], source_names: set[str]) -> dict[tuple[str, str], str]:
    """New names for the nodes and tensors ORT named: ``ort/<op>_<position>`` and
    ``ort/<position>:<k>`` (position in the canonical order), constants it made by their
    content; the prefix grows until no source name starts with it, so nothing collides
    (tf2onnx's own tensors are already called ``<node>:<k>``)."""
    prefix = "ort/"
    while any(name.startswith(prefix) for name in source_names):
        prefix = "_" + prefix
    renames: dict[tuple[str, str], str] = {}
    for position, index in enumerate(order):
        node = graph.node[index]
        if node.name and node.name not in source_names:
            renames["node", node.name] = f"{prefix}{node.op_type}_{position}"
        for k, out in enumerate(node.output):
            if out and out not in source_names:
                renames["value", out] = f"{prefix}{position}:{k}"
    for init in graph.initializer:
        if init.name not in source_names:
            renames["value", init.name] = f"{prefix}const_{_content_digest(init)[:16]}"
    return renames


def _content_digest(tensor: onnx.TensorProto) -> str:
    """What a constant holds (type, shape, data), whatever it is called."""
    content = onnx.TensorProto()
    content.CopyFrom(tensor)
    content.name = ""
    return _digest(content.SerializeToString())


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
