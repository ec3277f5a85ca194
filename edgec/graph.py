"""Small helpers over ``onnx_ir`` that every pass needs: constants, attributes, new initializers.

Kept deliberately thin: anything that is graph *policy* belongs in a pass, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a compile-time constant (initializer or folded), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The value's shape as ints, or None if unknown or any dim is symbolic."""
    if value.shape is None or not value.shape.is_static():
        return None
    return tuple(int(d) for d in value.shape.dims)


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else value.shape.rank()


def attr(node: ir.Node, name: str, default=None):
    """An attribute's Python value (ints, floats, strings, lists, tensors as numpy)."""
    a = node.attributes.get(name)
    if a is None:
        return default
    if a.type in (ir.AttributeType.TENSOR,):
        return a.value.numpy()
    if a.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(a.value)
    return a.value


def input_or_attr(node: ir.Node, index: int, name: str, default=None):
    """Opset-independent read of a parameter that moved from attribute to input (axes, split...)."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        data = constant(node.inputs[index])
        return None if data is None else data.tolist()
    return attr(node, name, default)


def add_initializer(graph: ir.Graph, array: np.ndarray, name_hint: str) -> ir.Value:
    """Register ``array`` as a new initializer with a name unique in ``graph``."""
    name = unique_name(graph, name_hint)
    array = np.ascontiguousarray(array)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def replace_initializer_data(value: ir.Value, array: np.ndarray) -> None:
    """Give an initializer new data in place (same name, possibly a new shape)."""
    array = np.ascontiguousarray(array)
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def unique_name(graph: ir.Graph, hint: str) -> str:
    taken = _names(graph)
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(o.name for o in node.outputs if o.name)
    return names


def take_name(new: ir.Value, old: ir.Value, graph: ir.Graph) -> None:
    """Give ``old``'s name to ``new`` (e.g. a graph output moving to another value); ``old``
    gets a fresh one so names stay unique."""
    name = old.name
    old.name = unique_name(graph, f"{name}_inner")
    new.name = name


def sole_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value``, if exactly one does and it is not a graph output."""
    consumers = value.consumers()
    if len(consumers) != 1 or value.is_graph_output():
        return None
    return consumers[0]


def normalize_axes(axes: Sequence[int], rank_: int) -> list[int]:
    return [a + rank_ if a < 0 else a for a in axes]


def op_histogram(graph: ir.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def set_bias(graph: ir.Graph, node: ir.Node, index: int, bias: np.ndarray) -> None:
    """Give ``node`` a new constant bias input, in place when no other node shares it."""
    current = node.inputs[index] if len(node.inputs) > index else None
    if current is not None and current.is_initializer() and len(current.uses()) == 1:
        replace_initializer_data(current, bias)
        return
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, add_initializer(graph, bias, f"{node.name or node.op_type}_bias"))
