"""The compression stage: the recipe's passes (pruning, factorization, fine-tuning...) and what they cost."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from edgec.analysis import summarize
from edgec.model import to_bytes
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.passes.quantize import QuantScheme
from edgec.recipe import Step, make_passes, trains
from edgec.runtime import Runner, TensorSpec
from edgec.runtime.ort import OrtRunner
from edgec.stages.context import BuildOptions, Progress
from edgec.stages.data import Samples, verification_inputs
from edgec.verify import Criterion, InputSet, compare, load_inputs

@dataclasses.dataclass
class Compressed:
    """The compression stage's result: the model the artifact is lowered from and verified against."""

    model: ir.Model
    records: list[PassRecord]
    report: dict[str, Any]  # report.json's "compression" (and "finetune") entries
    files: dict[str, bytes]  # <model>.compressed.onnx or <model>.finetuned.onnx
    reference: Runner  # the compressed model in ONNX Runtime
    # Activation ranges a quantization-aware finetune step learned (ONNX value → [low, high]), for the int8 stage.
    ranges: dict[str, list[float]] | None = None


def compress(model: ir.Model, stem: str, steps: Sequence[Step], samples: Samples, source: Runner, options: BuildOptions,
             progress: Progress, int8: QuantScheme | None = None) -> Compressed:
    """Run the recipe's passes and measure what they cost: MACs and parameters before and
    after, and how far the compressed model's outputs moved from the source's on the
    verification inputs (the artifact is then verified against the compressed model).
    ``int8`` is the target's scheme when the build is int8 (what QAT trains toward)."""
    before = summarize(model)
    training = _training_context(model, options, progress, int8) if trains(steps) else None
    with progress.stage(f"Compressing ({', '.join(s.name for s in steps)})"):
        model, records = Pipeline(make_passes(steps, samples.calibration, training), progress.pass_done)(model)
    after = summarize(model)
    with progress.stage("Measuring the compressed model against the source"):
        compressed = OrtRunner(to_bytes(model), threads=1, optimization="disabled")
        error = compare(source, compressed, verification_inputs(compressed, options, samples.verify_on), Criterion())
    report = {"compression": {
        "steps": [s.to_dict() for s in steps],
        "macs": {"before": before["macs"], "after": after["macs"]},
        "params": {"before": before["params"], "after": after["params"]},
        "mac_reduction": round(1 - after["macs"] / before["macs"], 6) if before["macs"] else 0.0,
        "vs_source": error.to_dict(),
    }, **{"finetune": r.details for r in records if r.name == "finetune"}}
    ranges = report.get("finetune", {}).get("qat", {}).get("ranges")
    return Compressed(model, records, report, {f"{stem}.{compressed_kind(steps)}.onnx": to_bytes(model)}, compressed, ranges)


def _training_context(source: ir.Model, options: BuildOptions, progress: Progress, int8: QuantScheme | None):
    """What fine-tuning steps distill from (the model before compression) and report to."""
    from edgec.train import TrainingContext

    def read(path: str, specs: list[TensorSpec]) -> InputSet:
        return load_inputs(path, specs, images=options.images)

    return TrainingContext(to_bytes(source), read, options.seed, getattr(progress, "epoch", None),
                           None if int8 is None else int8.weight_qmax)


def compressed_kind(steps: Sequence[Step]) -> str:
    return "finetuned" if trains(steps) else "compressed"
