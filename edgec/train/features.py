"""Distillation on intermediate features as well as outputs.

A detector's two outputs on 24 photos are few numbers to learn from. The student still
computes, at the end of each stage, a tensor of the source's spatial size, with fewer
channels where pruning removed some (a residual stream's channels go together): each of its
channels is matched to the source channel it correlates with most on the training inputs
before training (the one it was kept from: pruning reconstructs the rest to match), and
pulled toward it by variance-scaled MSE. Both models go through the same lowering
(``prepare`` → ``to_keras``), so a tensor is found in both by its ONNX value name, in the
same channels-last layout. The source's features are computed once, as its outputs are.

Which tensors: the outputs of ``Add`` nodes (residual joins) in both models with the same
shape but for fewer channels, the last one of each spatial size (a stage's output), at most
``MAX_FEATURES``, the deepest kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import tensorflow as tf
import tf_keras as keras

from edgec.lower.tflite import KerasLowering

FEATURE_OPS = {"Add"}
MAX_FEATURES = 6
BATCH = 32  # samples through the source's Keras model at once


def shared_features(teacher: ir.Model, student: ir.Model) -> list[str]:
    """Names of the residual-join tensors both prepared models compute at the same spatial size."""
    shapes = {v.name: _dims(v) for node in teacher.graph for v in node.outputs if node.op_type in FEATURE_OPS}
    last: dict[tuple, str] = {}
    for node in student.graph:
        value, dims = node.outputs[0], _dims(node.outputs[0])
        source = shapes.get(value.name, ())
        if (node.op_type in FEATURE_OPS and node.domain in ("", "ai.onnx") and not value.is_graph_output() and len(dims) >= 3
                and len(source) == len(dims) and source[:-1] == dims[:-1] and dims[-1] <= source[-1]):
            last.pop(dims[:-1], None)
            last[dims[:-1]] = value.name  # re-inserted: the dict keeps the order stages end in
    return list(last.values())[-MAX_FEATURES:]


def _dims(value: ir.Value) -> tuple:
    return tuple(value.shape.dims) if value.shape is not None else ()


def with_features(lowering: KerasLowering, names: list[str]) -> keras.Model:
    """The lowered model with ``names``' tensors as extra outputs after its own (same layers)."""
    model = lowering.model
    return keras.Model(model.inputs, [*model.outputs, *(lowering.tensors[n] for n in names)], name=model.name)


def feature_targets(source: KerasLowering, student: KerasLowering, names: list[str], inputs: list[np.ndarray],
                    more: list[list[np.ndarray]]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """The source's tensors ``names`` on ``inputs``, each reduced to the student's channels
    (matched on ``inputs``, before training), and the same for each input set of ``more``."""
    taught, learner = features_of(source, names, inputs), features_of(student, names, inputs)
    matches = [_match(s, t) for s, t in zip(learner, taught)]
    pick = lambda features: [f[..., m] for f, m in zip(features, matches)]  # noqa: E731
    return pick(taught), [pick(features_of(source, names, other)) for other in more]


def _match(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """For each student channel (last axis), the teacher channel it correlates with most."""
    s, t = (a.reshape(-1, a.shape[-1]).astype(np.float64) for a in (student, teacher))
    s, t = ((a - a.mean(0)) / (a.std(0) + 1e-12) for a in (s, t))
    return np.argmax(s.T @ t, axis=1)


def features_of(lowering: KerasLowering, names: list[str], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The tensors ``names`` of ``lowering``'s model on stacked Keras-layout ``inputs``."""
    model = keras.Model(lowering.model.inputs, [lowering.tensors[n] for n in names])

    @tf.function(reduce_retracing=True)
    def run(xs):
        result = tf.vectorized_map(lambda x: model(list(x), training=False), xs)
        return list(result) if isinstance(result, (list, tuple)) else [result]

    parts = [run(tuple(tf.constant(a[i:i + BATCH]) for a in inputs)) for i in range(0, len(inputs[0]), BATCH)]
    return [np.concatenate([p[k].numpy() for p in parts]) for k in range(len(names))]
