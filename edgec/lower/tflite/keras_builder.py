"""Build a tf_keras functional model from a channels-last ONNX graph, one rule per node.

The result is a real Keras model (Conv2D, DepthwiseConv2D, Dense, LayerNormalization, ...
where a layer exists, TF ops recorded as layers where none does): it converts to TFLite,
and it can be wrapped by tensorflow-model-optimization for pruning or quantization-aware
training.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import tensorflow as tf
import tf_keras as keras
from onnx.reference import ReferenceEvaluator

from edgec.crash import at
from edgec.errors import EdgecError, UnsupportedOpError
from edgec.graph import attr, constant
from edgec.lower.tflite import ops  # noqa: F401  (registers the rules)
from edgec.lower.tflite.context import ORT_HINT, NodeContext, is_tensor, sanitize, tf_dtype
from edgec.lower.tflite.registry import lookup, unexpected_arguments
from edgec.passes.layout import LAYOUT_PERM


@dataclasses.dataclass
class KerasLowering:
    """The Keras model, how its inputs/outputs relate to the source model's, and which
    Keras layers each ONNX node became (for per-layer precision choices)."""

    model: keras.Model
    io: dict[str, list[dict[str, Any]]]
    layers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tensors: dict[str, Any] = dataclasses.field(default_factory=dict)  # value name → its Keras tensor (feature distillation)


def to_keras(model: ir.Model, target: str = "tflite", loops: bool = True) -> KerasLowering:
    """Lower a canonical, channels-last IR model to a tf_keras functional model.

    ``loops=False`` keeps rules from emitting control flow (TFLite WHILE), which the
    converter's int8 calibration crashes on. Clears the Keras session first so layer names
    (and hence artifacts) are deterministic.
    """
    keras.backend.clear_session()
    return _Builder(model, target, loops).build()


class _Builder:
    def __init__(self, model: ir.Model, target: str, loops: bool):
        self.model = model
        self.target = target
        self.loops = loops
        self.names: set[str] = set()
        self.layers: dict[str, list[str]] = {}
        self.tensors: dict[ir.Value, Any] = {}

    def build(self) -> KerasLowering:
        graph = self.model.graph
        inputs = [self._input(v) for v in graph.inputs]
        for node in graph:
            self._lower(node)
        outputs = [self._output(v) for v in graph.outputs]
        keras_model = keras.Model(inputs=[t for t, _ in inputs], outputs=[t for t, _ in outputs], name=sanitize(graph.name or "edgec"))
        io = {"inputs": [entry for _, entry in inputs], "outputs": [entry for _, entry in outputs]}
        tensors = {value.name: tensor for value, tensor in self.tensors.items() if is_tensor(tensor)}
        return KerasLowering(keras_model, io, self.layers, tensors)

    def _unique(self, name: str) -> str:
        base, i = sanitize(name), 1
        name = base
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def _input(self, value: ir.Value):
        shape = [int(d) for d in value.shape.dims]
        if not shape:
            raise UnsupportedOpError("Input", value.name, target=self.target, reason="scalar model inputs", hint=ORT_HINT)
        key = self._unique(value.name)
        tensor = keras.Input(shape=shape[1:], batch_size=shape[0], name=key, dtype=tf_dtype(value.dtype))
        self.tensors[value] = tensor
        return tensor, _io_entry(value, key)

    def _output(self, value: ir.Value):
        tensor = self._value(value)
        if isinstance(tensor, np.ndarray):
            raise UnsupportedOpError("Output", value.name, target=self.target, reason="the output is a constant", hint=ORT_HINT)
        key = self._unique(value.name)
        return keras.layers.Identity(name=key)(tensor), _io_entry(value, key)

    def _value(self, value: ir.Value | None):
        if value is None:
            return None
        data = constant(value)
        return data if data is not None else self.tensors[value]

    def _lower(self, node: ir.Node) -> None:
        args = [self._value(v) for v in node.inputs]
        while args and args[-1] is None:
            args.pop()
        with at("node", f"'{node.name}' ({node.op_type})"):
            if not any(a is not None and not isinstance(a, np.ndarray) for a in args):
                results = _evaluate(node, args, self.model.opset_imports)
            else:
                results = self._apply_rule(node, args)
        results = results if isinstance(results, (tuple, list)) else (results,)
        for value, result in zip(node.outputs, results):
            self.tensors[value] = result

    def _apply_rule(self, node: ir.Node, args: list) -> Any:
        ctx = NodeContext(node, self.target, self.names, self.loops)
        fn = lookup(node.domain, node.op_type)
        if fn is None:
            ctx.unsupported("edgec has no TFLite rule for this op")
        attributes = {name: attr(node, name) for name in node.attributes}
        problem = unexpected_arguments(fn, len(args), attributes)
        if problem:
            ctx.unsupported(f"inputs or attributes its TFLite rule does not handle ({problem})")
        try:
            result = fn(ctx, *args, **attributes)
        except EdgecError:
            raise
        except (ValueError, TypeError, tf.errors.OpError) as exc:
            ctx.unsupported(f"TensorFlow rejected it: {str(exc).splitlines()[0]}")
        self.layers[node.name] = _layers_between(args, result)
        return result


def _layers_between(args: list, result: Any) -> list[str]:
    """Names of the Keras layers a rule created: walk back from its results to its inputs
    (real layers and the TFOpLambda layers tf ops become alike)."""
    stop = {id(a) for a in args}
    stack = [r for r in (result if isinstance(result, (tuple, list)) else (result,)) if is_tensor(r)]
    names: set[str] = set()
    while stack:
        tensor = stack.pop()
        history = getattr(tensor, "_keras_history", None)
        if id(tensor) in stop or history is None or isinstance(history.layer, keras.layers.InputLayer):
            continue
        if history.layer.name not in names:
            names.add(history.layer.name)
            stack.extend(history.layer._inbound_nodes[history.node_index].keras_inputs)
    return sorted(names)


def _io_entry(value: ir.Value, key: str) -> dict[str, Any]:
    rank = value.shape.rank() if value.shape is not None else 0
    perm = value.meta.get(LAYOUT_PERM, tuple(range(rank)))
    return {"name": value.name, "key": key, "perm": [int(p) for p in perm]}


def _evaluate(node: ir.Node, args: list, opsets: dict[str, int]) -> tuple[np.ndarray, ...]:
    """Compute a node whose inputs are all constants (left unfolded, e.g. for size)."""
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(args)]
    proto = onnx.helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.outputs))], domain=node.domain)
    # Serialized as typed, not as Python values: a tensor attribute (ConstantOfShape's value)
    # would otherwise become a list of floats the evaluator cannot read.
    proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    evaluator = ReferenceEvaluator(proto, opsets={"": opsets.get("", 17)})
    return tuple(evaluator.run(None, {n: a for n, a in zip(names, args) if n}))
