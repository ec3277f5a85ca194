"""Intermediate activations of a float model on calibration data.

Data-aware passes (bias correction, reconstruction after pruning, data-aware factorization)
need what flows into and out of particular layers on real samples. They get it by running a
copy of the model, in ONNX Runtime with graph optimizations off, with those tensors exposed as
extra outputs; the model itself is never changed.
"""

from __future__ import annotations

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
    for batch in batches:
        everything = {**batch, **runner.run(batch)}
        yield {name: everything[name] for name in wanted}


def capture(model: ir.Model, values: Iterable[ir.Value], batches: Sequence[Sample]) -> dict[str, np.ndarray]:
    """``values`` over all ``batches``, concatenated along the batch axis (axis 0)."""
    collected: dict[str, list[np.ndarray]] = {}
    for arrays in activations(model, values, batches):
        for name, array in arrays.items():
            collected.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in collected.items()}


def _exposing(model: ir.Model, values: Iterable[ir.Value]) -> bytes:
    proto = to_proto(model)
    exposed = {v.name for v in model.graph.inputs} | {v.name for v in model.graph.outputs}
    for value in values:
        if value.name not in exposed:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(value.name, value.dtype, None))
            exposed.add(value.name)
    return proto.SerializeToString()
