"""The verification stage: the artifact against its reference model, on the same inputs."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from edgec.errors import ModelLoadError, VerificationError
from edgec.lower import Lowered
from edgec.runtime import Runner, compare_threads, open_runner
from edgec.stages.context import BuildOptions
from edgec.stages.data import verification_inputs
from edgec.targets import Target
from edgec.verify import FLOAT_NOISE_LIMIT, Criterion, InputSet, OutputComparison, Verification, compare

def open_artifact(directory: Path, lowered: Lowered, target: Target, threads: int) -> Runner:
    """A runner on the primary artifact, written to a scratch ``directory``. edgec made the
    artifact, so a runtime refusing it is a bug in edgec, not the user's error."""
    try:
        return open_runner(write_primary(directory, lowered), threads=threads, options=target.runtime)
    except ModelLoadError as exc:
        raise RuntimeError(f"the runtime cannot load edgec's own {lowered.primary}: {exc}") from exc


def write_primary(directory: Path, lowered: Lowered) -> Path:
    """The primary artifact, written to a scratch ``directory``."""
    directory.mkdir(exist_ok=True)
    path = directory / lowered.primary
    path.write_bytes(lowered.files[lowered.primary])
    return path


def criterion(target: Target, precision: str, options: BuildOptions) -> Criterion:
    """The target's verification criterion for ``precision``, with the user's overrides."""
    chosen = target.criteria[precision]
    if options.tolerance is not None:  # the user's bound, as given
        chosen = dataclasses.replace(chosen, tolerance=options.tolerance, float_noise_multiple=None)
    if options.min_cosine is not None:
        chosen = dataclasses.replace(chosen, min_cosine=options.min_cosine)
    return chosen


def verify_bytes(reference: Runner, lowered: Lowered, target: Target, options: BuildOptions, criterion: Criterion,
                 fallback: InputSet | None = None) -> Verification:
    """Write the primary artifact to a scratch file and compare it with the reference model."""
    with tempfile.TemporaryDirectory(prefix="edgec-verify-") as tmp:
        artifact = open_artifact(Path(tmp), lowered, target, threads=compare_threads(Path(lowered.primary).suffix))
        return verify_runners(reference, artifact, options, criterion, fallback)


def verify_runners(source: Runner, artifact: Runner, options: BuildOptions, criterion: Criterion,
                   fallback: InputSet | None = None) -> Verification:
    """``fallback``: what to verify on without --inputs (see :func:`verification_inputs`)."""
    inputs = verification_inputs(artifact, options, fallback)
    return compare(source, artifact, inputs, criterion)


def verification_error(v: Verification, precision: str, fp32_instead_of_int8: bool = False) -> VerificationError:
    failed = next(o for o in v.outputs if not o.passed)
    shipped = (" The speed check built fp32 because int8 was not faster, and fp32 is held to the fp32 "
               "criterion; --no-speed-check keeps int8.") if fp32_instead_of_int8 else ""
    return VerificationError(
        f"The artifact does not match the source model: output '{failed.name}' has max abs error "
        f"{failed.max_abs_error:.3g} (max |reference| {failed.max_abs_reference:.3g}, relative "
        f"{failed.relative_error:.3g}) and cosine {failed.cosine:.4f}; required: {v.criterion.describe()}; "
        f"nothing was written.{shipped}",
        hint=_hint(failed, v.criterion, precision),
    )


def _hint(failed: OutputComparison, chosen: Criterion, precision: str) -> str:
    if precision == "int8":
        return INT8_MISMATCH_HINT
    if chosen.stretches and (failed.float_noise or 0) > FLOAT_NOISE_LIMIT:
        return (f"ONNX Runtime itself moves this output by {failed.float_noise:.3g} (relative) between its graph "
                "optimizations on and off: the model is numerically unstable on these inputs, so no artifact can "
                "match it closely. Verify on real samples (--inputs), or relax --tolerance.")
    return LOWERING_MISMATCH_HINT


LOWERING_MISMATCH_HINT = "Relax --tolerance / --min-cosine if this error is acceptable, or report the model as a lowering bug."
# The int8 ranges and the layers kept float were chosen on the calibration samples, so an int8
# artifact that misses on other inputs is most often calibrated on data unlike them.
INT8_MISMATCH_HINT = ("The int8 ranges and the layers kept float were chosen on the calibration samples (--calib): calibrate on "
                      "samples like the verification inputs, build --precision fp32, or relax --min-cosine if this error is acceptable.")
