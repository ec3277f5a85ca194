"""The source stage: the user's model canonicalized, and run once in ONNX Runtime as the reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from edgec.model import load, load_proto
from edgec.passes.canonicalize import canonicalize_passes
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.runtime import Runner, TensorSpec
from edgec.runtime.ort import OrtRunner
from edgec.stages.context import Progress, SilentProgress
from edgec.verify import random_inputs


def load_source(path: Path, input_shapes: Mapping[str, Sequence[int]], seed: int,
                progress: Progress) -> tuple[ir.Model, list[PassRecord], Runner]:
    """The user's model, canonicalized (with the records of what that did), and the
    reference: the user's own file in ONNX Runtime, checked to run."""
    with progress.stage(f"Loading {path.name}"):
        model = load(path)
    model, records = canonicalize(model, input_shapes, progress)
    with progress.stage("Running the source model once in ONNX Runtime"):
        return model, records, _check_runs(source_runner(path), model, seed)


def _check_runs(source: Runner, model: ir.Model, seed: int) -> Runner:
    """``source``, once it ran the first random verification batch: a model the ONNX checker
    passes can still hold a node ONNX Runtime refuses (a Conv with group 0, a Gemm bias that
    does not broadcast), and that is the model's fault, to be said before any lowering."""
    source.run(random_inputs(input_specs(model), seed=seed, count=1).batches[0])
    return source


def input_specs(model: ir.Model) -> list[TensorSpec]:
    """The (static, canonical) inputs of ``model`` as runners describe them, with the number
    of rows of the table an integer input indexes (so random token ids cover a vocabulary)."""
    return [TensorSpec(v.name, tuple(v.shape.numpy()), v.dtype.numpy(), _index_limit(v)) for v in model.graph.inputs]


# Ops an index passes through unchanged on its way to a Gather (casts and reshapes of token ids).
INDEX_CARRIERS = frozenset({"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _index_limit(value: ir.Value) -> int | None:
    """The fewest rows among the constant tables ``value`` indexes as a Gather's indices, or
    None if it indexes none: any value below that is a valid index for every such Gather."""
    limits = []
    for use in value.uses():
        node = use.node
        if node.op_type in INDEX_CARRIERS and use.idx == 0 and len(node.outputs) == 1:
            limits.append(_index_limit(node.outputs[0]))
        elif node.op_type == "Gather" and use.idx == 1 and node.inputs[0].const_value is not None:
            axis = node.attributes.get_int("axis", 0)
            limits.append(node.inputs[0].const_value.shape[axis])
    found = [limit for limit in limits if limit]
    return min(found) if found else None


def canonicalize(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]], progress: Progress | None = None
) -> tuple[ir.Model, list[PassRecord]]:
    progress = progress or SilentProgress()
    with progress.stage("Canonicalizing (shapes, constant folding, BatchNorm folding)"):
        return Pipeline(canonicalize_passes(input_shapes), observer=progress.pass_done)(model)


def source_runner(path: Path) -> Runner:
    """The reference: the user's own file in ONNX Runtime with graph optimizations off."""
    proto = load_proto(path)
    return OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled", user_file=path.name)
