"""``edgec build``: load → canonicalize → lower → verify → write artifacts and report.

The build is deterministic: the same model, target, inputs and seed give byte-identical
artifacts and the same ``report.json`` (wall times are shown as progress, never recorded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import onnx_ir as ir

from edgec import __version__
from edgec.analysis import summarize
from edgec.errors import EdgecWarning, VerificationError
from edgec.images import ImagePreprocess
from edgec.lower import Lowered, LowerOptions, lower
from edgec.model import load, load_proto
from edgec.outputs import OutputDir
from edgec.passes.canonicalize import canonicalize_passes
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.report import versions, write_json
from edgec.runtime import Runner, TensorSpec, open_runner
from edgec.runtime.ort import OrtRunner
from edgec.targets import Target, load_target
from edgec.verify import Criterion, InputSet, Verification, compare, load_inputs, random_inputs


class Progress(Protocol):
    """How a build reports what it is doing (the CLI shows it; the API ignores it)."""

    def stage(self, description: str) -> contextlib.AbstractContextManager: ...

    def pass_done(self, record: PassRecord, seconds: float) -> None: ...


class SilentProgress:
    def stage(self, description: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def pass_done(self, record: PassRecord, seconds: float) -> None:
        pass


@dataclasses.dataclass
class BuildOptions:
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    inputs: str | None = None  # .npz/.npy verification inputs; random when None
    max_samples: int | None = None
    tolerance: float | None = None  # overrides the target's max relative error
    min_cosine: float | None = None  # overrides the target's minimum cosine
    seed: int = 0
    precision: str | None = None  # fp32 / fp16 / int8; the target's when None
    calib: str | None = None  # .npz/.npy calibration samples for int8; random (with a warning) when None
    calib_samples: int = 128
    int8_io: bool = False  # int8 artifacts take and return int8 tensors instead of float
    images: ImagePreprocess = ImagePreprocess()  # how image folders given as inputs/calib become tensors


RANDOM_CALIBRATION_WARNING = (
    "Quantizing with random calibration inputs: activation ranges will not match real data "
    "and accuracy may suffer. Pass --calib with real samples."
)


@dataclasses.dataclass
class BuildResult:
    report: dict[str, Any]
    artifacts: list[Path]
    report_path: Path
    verification: Verification


def build(
    model_path: str | os.PathLike[str],
    target: str | Target,
    out_dir: str | os.PathLike[str],
    options: BuildOptions | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Compile ``model_path`` for ``target`` into ``out_dir``; raise ``EdgecError`` on failure."""
    options = options or BuildOptions()
    progress = progress or SilentProgress()
    target = target if isinstance(target, Target) else load_target(target)
    out = OutputDir(out_dir)
    try:
        return _build(Path(model_path), target, out, options, progress)
    except BaseException:
        out.discard()
        raise


def _build(path: Path, target: Target, out: OutputDir, options: BuildOptions, progress: Progress) -> BuildResult:
    with progress.stage(f"Loading {path.name}"):
        model = load(path)
    model, records = canonicalize(model, options.input_shapes, progress)
    precision = options.precision or target.precision
    calibration = _calibration(model, precision, options)
    with progress.stage(f"Lowering for {target.name} ({target.backend}, {precision})"):
        lowered = lower(model, target, path.stem, LowerOptions(precision, calibration.batches, options.int8_io))
    with progress.stage("Verifying against the source model"):
        verification = verify_bytes(path, lowered, target, options, criterion(target, precision, options))
    if not verification.passed:
        raise _verification_error(verification)
    report = _report(path, target, model, records, lowered, verification, options)
    report["precision"] = precision
    if precision == "int8":  # the flag that says whether the ranges came from real data
        report["calibration"] = {**calibration.to_dict(), "real_data": options.calib is not None}
    files = dict(lowered.files)
    files["report.json"] = write_json(report)
    written = out.commit(files, last="report.json")
    return BuildResult(report, written[:-1], out.path / "report.json", verification)


def canonicalize(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]], progress: Progress | None = None
) -> tuple[ir.Model, list[PassRecord]]:
    progress = progress or SilentProgress()
    with progress.stage("Canonicalizing (shapes, constant folding, BatchNorm folding)"):
        return Pipeline(canonicalize_passes(input_shapes), observer=progress.pass_done)(model)


def _calibration(model: ir.Model, precision: str, options: BuildOptions) -> InputSet:
    """int8 calibration samples from ``--calib``, or seeded random ones with a warning."""
    if precision != "int8":
        return InputSet([], "none")
    specs = [TensorSpec(v.name, tuple(v.shape.numpy()), v.dtype.numpy()) for v in model.graph.inputs]
    if options.calib:
        return load_inputs(options.calib, specs, limit=options.calib_samples, images=options.images)
    warnings.warn(RANDOM_CALIBRATION_WARNING, EdgecWarning, stacklevel=4)
    # seed + 1: a different stream from the random verification inputs.
    return random_inputs(specs, seed=options.seed + 1, count=options.calib_samples)


def criterion(target: Target, precision: str, options: BuildOptions) -> Criterion:
    """The target's verification criterion for ``precision``, with the user's overrides."""
    chosen = target.criteria[precision]
    if options.tolerance is not None:
        chosen = dataclasses.replace(chosen, tolerance=options.tolerance)
    if options.min_cosine is not None:
        chosen = dataclasses.replace(chosen, min_cosine=options.min_cosine)
    return chosen


def verify_bytes(source: Path, lowered: Lowered, target: Target, options: BuildOptions, criterion: Criterion) -> Verification:
    """Write the primary artifact to a scratch file and compare it with the source model."""
    with tempfile.TemporaryDirectory(prefix="edgec-verify-") as tmp:
        artifact_path = Path(tmp) / lowered.primary
        artifact_path.write_bytes(lowered.files[lowered.primary])
        artifact = open_runner(artifact_path, threads=1, options=target.runtime)
        return verify_runners(source_runner(source), artifact, options, criterion)


def source_runner(path: Path) -> Runner:
    """The reference: the user's own file in ONNX Runtime with graph optimizations off."""
    proto = load_proto(path)
    return OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled")


def verify_runners(source: Runner, artifact: Runner, options: BuildOptions, criterion: Criterion) -> Verification:
    inputs = _inputs(artifact, options)
    return compare(source, artifact, inputs, criterion)


def _inputs(artifact: Runner, options: BuildOptions) -> InputSet:
    # The artifact's specs are static and named as in the source, so data is made from them.
    if options.inputs:
        return load_inputs(options.inputs, artifact.inputs, limit=options.max_samples, images=options.images)
    return random_inputs(artifact.inputs, seed=options.seed)


def _verification_error(v: Verification) -> VerificationError:
    failed = next(o for o in v.outputs if not o.passed)
    return VerificationError(
        f"The artifact does not match the source model: output '{failed.name}' has max abs error "
        f"{failed.max_abs_error:.3g} (max |reference| {failed.max_abs_reference:.3g}, relative "
        f"{failed.relative_error:.3g}) and cosine {failed.cosine:.4f}; required: {v.criterion.describe()}; "
        "nothing was written.",
        hint="Relax --tolerance / --min-cosine if this error is acceptable, or report the model as a lowering bug.",
    )


def _report(path, target, model, records, lowered, verification, options) -> dict[str, Any]:
    content = path.read_bytes()
    return {
        "edgec_version": __version__,
        "status": "ok",
        "source": {
            "path": str(path),
            "sha256": hashlib.sha256(content).hexdigest(),
            "size_bytes": len(content),
        },
        "target": target.to_dict(),
        "options": {
            "input_shapes": {k: list(v) for k, v in options.input_shapes.items()},
            "seed": options.seed,
            "int8_io": options.int8_io,
            "images": dataclasses.asdict(options.images),
        },
        "model": summarize(model),
        "passes": [r.to_dict() for r in records],
        "lowering": lowered.details,
        "artifacts": [
            {"file": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in lowered.files.items()
        ],
        "verification": verification.to_dict(),
        "versions": versions(),
    }
