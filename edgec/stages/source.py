"""The source stage: the user's model canonicalized, and run once in ONNX Runtime as the reference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from edgec.errors import ModelCheckError
from edgec.model import load, load_proto
from edgec.passes.canonicalize import canonicalize_passes
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.runtime import TensorSpec
from edgec.runtime.ort import OrtRunner
from edgec.stages.context import Progress, SilentProgress
from edgec.verify import InputSet


def load_source(path: Path, input_shapes: Mapping[str, Sequence[int]],
                progress: Progress) -> tuple[ir.Model, list[PassRecord], OrtRunner]:
    """The user's model, canonicalized (with the records of what that did), and the
    reference: the user's own file in ONNX Runtime (``check_runs`` runs it first)."""
    with progress.stage(f"Loading {path.name}"):
        model = load(path)
    model, records = canonicalize(model, input_shapes, progress)
    return model, records, source_runner(path)


def check_runs(source: OrtRunner, inputs: InputSet, progress: Progress) -> None:
    """Run the first batch of ``inputs`` (the first the artifact is verified on) through the
    source model. A model the ONNX checker passes can still hold a node ONNX Runtime refuses
    (a Conv with group 0, a Gemm bias that does not broadcast) or crashes on (an integer
    division by a zero of the data): the model's fault or its data's, to be said before any
    lowering, and a crash must not take edgec with it, so the batch runs in a child first."""
    with progress.stage("Running the source model once in ONNX Runtime"):
        batch = inputs.batches[0]
        crashed = source.crash_signal(batch)
        if crashed is not None:
            raise ModelCheckError(
                f"ONNX Runtime crashed ({crashed.name}) running '{source.user_file}' on the first batch of "
                f"{inputs.source}, the data the artifact is verified on.",
                hint="Give inputs the model accepts with --inputs (random integer inputs are 0 or 1, and a "
                     "division by 0 traps); if it crashes on real data too, the model or ONNX Runtime has a bug to report.",
            )
        source.run(batch)


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


def source_runner(path: Path) -> OrtRunner:
    """The reference: the user's own file in ONNX Runtime with graph optimizations off."""
    proto = load_proto(path)
    return OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled", user_file=path.name)
