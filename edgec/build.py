"""``edgec build``: a short sequence of stages (edgec.stages): source → compress → lower (int8:
quantize and decide) → verify → profile → report, then the artifacts written atomically.

The build is deterministic: the same model, target, inputs and seed give byte-identical
artifacts and the same ``report.json`` (wall times are shown as progress, never recorded).
``edgec optimize`` evaluates its candidates through this same function.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgec.checks import option
from edgec.errors import DeviceError, EdgecWarning, OptionError, QuantizationError
from edgec.lower import Lowered, LowerOptions, check_precision, lower
from edgec.outputs import OutputDir
from edgec.passes.pipeline import PassRecord
from edgec.profile import Device, foreign_device_warning, get_device
from edgec.recipe import quantization_aware
from edgec.report import write_json
from edgec.runtime import Runner
from edgec.stages.compress import compress, compressed_kind
from edgec.stages.context import INT8_OPTIONS, BuildOptions, Marked, Progress, SilentProgress
from edgec.stages.data import Samples
from edgec.stages.int8 import lower_int8
from edgec.stages.profile import profile_artifact
from edgec.stages.report import build_report
from edgec.stages.source import canonicalize, check_runs, input_specs, load_source
from edgec.stages.verify import criterion, verification_error, verify_bytes
from edgec.targets import Target, load_target, same_arch
from edgec.verify import Verification

__all__ = ["BuildOptions", "BuildResult", "Progress", "SilentProgress", "build", "canonicalize", "input_specs"]


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
    """Compile ``model_path`` for ``target`` into ``out_dir``; raise ``EdgecError`` on a user's
    error. Any other exception is a bug, marked with the stage, pass and node it struck in
    (``edgec.crash.where``); either way ``out_dir`` is left as it was."""
    options = options or BuildOptions()
    progress = Marked(progress or SilentProgress())
    target = target if isinstance(target, Target) else load_target(target)
    for key in ("profile_device", "speed_device"):  # an unknown device fails before the build
        if isinstance(getattr(options, key), str):
            options = dataclasses.replace(options, **{key: get_device(getattr(options, key), options.devices)})
    _check_speed_device(options.speed_device, target)
    if options.profile_device is not None:
        foreign = foreign_device_warning(f"the {target.backend} artifact", target.name, target.arch, options.profile_device)
        if foreign:
            warnings.warn(foreign, EdgecWarning, stacklevel=2)
    check_precision(target, options.precision or target.precision)
    _check_qat(options, target)
    _warn_ignored(options, target, options.precision or target.precision)
    _check_calib_method(options, target)
    out = OutputDir(out_dir)
    try:
        return _build(Path(model_path), target, out, options, progress)
    except BaseException:
        out.discard()
        raise


ORT_ONLY_OPTIONS = ("keep_float",)  # the TFLite lowering has none
FLAGS = {"speed_check": "--no-speed-check", "speed_device": "--speed-check-on", "equalize": "--equalize/--no-equalize",
         "equalize_activations": "--equalize-activations/--no-equalize-activations", "bias_correction": "--bias-correction/--no-bias-correction"}  # where not --field-name


def _warn_ignored(options: BuildOptions, target: Target, precision: str) -> None:
    """Options given that this build will not use, said instead of silently dropped."""
    defaults = BuildOptions()
    given = [k for k in INT8_OPTIONS if getattr(options, k) != getattr(defaults, k)]
    ignored = given if precision != "int8" else [k for k in given if target.backend != "ort" and k in ORT_ONLY_OPTIONS]
    if ignored:
        why = f"a {precision} build" if precision != "int8" else f"the {target.backend} backend"
        warnings.warn(f"{', '.join(option(k, FLAGS.get(k)) for k in ignored)} {'does' if len(ignored) == 1 else 'do'} nothing in {why}; "
                      "ignored.", EdgecWarning, stacklevel=3)


def _check_qat(options: BuildOptions, target: Target) -> None:
    """Quantization-aware training trains for the build's int8 scheme: refused before any work otherwise."""
    precision = options.precision or target.precision
    if quantization_aware(options.recipe) and precision != "int8":
        raise OptionError(f"Quantization-aware training (--qat, qat = true) trains the model for int8, and this is a {precision} build.",
                          hint="Add --precision int8, or drop --qat.")


TFLITE_CALIB_METHODS = ("minmax", "mse")  # the converter calibrates min/max; edgec.ranges refines to mse


def _check_calib_method(options: BuildOptions, target: Target) -> None:
    if target.backend == "tflite" and options.calib_method not in (None, *TFLITE_CALIB_METHODS):
        raise QuantizationError(f"--calib-method {options.calib_method} is not available for {target.name}.",
                                hint=f"Use one of {', '.join(TFLITE_CALIB_METHODS)} for TFLite targets (all four for ONNX Runtime).")


def _check_speed_device(device: Device | None, target: Target) -> None:
    if device is not None and not same_arch(device.arch, target.arch):
        raise DeviceError(f"Device '{device.name}' is {device.arch}, target '{target.name}' is {target.arch}: "
                          "it cannot check the target's int8 speed.", reason="config",
                          hint="Name a device of the target's architecture with --speed-check-on.")


def _build(path: Path, target: Target, out: OutputDir, options: BuildOptions, progress: Progress) -> BuildResult:
    model, records, source = load_source(path, options.input_shapes, progress)
    samples = Samples(model, options)
    check_runs(source, samples.first_verified(), progress)
    int8 = target.quantize if (options.precision or target.precision) == "int8" else None
    compressed = compress(model, path.stem, options.recipe, samples, source, options, progress, int8) if options.recipe else None
    if compressed:
        model, records = compressed.model, records + compressed.records
    lowered, precision, more, int8_report = _lower(model, path.stem, target, samples, options, progress,
                                                   compressed.ranges if compressed else None)
    verification = _verify(compressed.reference if compressed else source, lowered, target, precision, samples, options,
                           compressed_kind(options.recipe) if compressed else "source", progress)
    report = {**build_report(path, target, model, records + more, lowered, verification, options), "precision": precision,
              **(compressed.report if compressed else {}), **int8_report}
    files = {**lowered.files, **(compressed.files if compressed else {}), **_html(report, lowered, options, out.path, progress)}
    written = out.commit({**files, "report.json": write_json(report)}, last="report.json")
    return BuildResult(report, written[:-1], out.path / "report.json", verification)


def _lower(model: ir.Model, stem: str, target: Target, samples: Samples, options: BuildOptions, progress: Progress,
           ranges: dict[str, list[float]] | None = None) -> tuple[Lowered, str, list[PassRecord], dict[str, Any]]:
    """The lowered artifact, the precision it ships in, the records of passes it got (int8's
    accuracy recovery, unless the speed check shipped fp32 instead) and int8's report entries.
    ``ranges``: activation ranges quantization-aware training learned, which int8 quantizes with."""
    precision = options.precision or target.precision
    if precision != "int8":
        with progress.stage(f"Lowering for {target.name} ({target.backend}, {precision})"):
            return lower(model, target, stem, LowerOptions(precision)), precision, [], {}
    lowered, records, report = lower_int8(model, stem, target, samples.calibration(), options, progress, ranges)
    shipped = report.get("speed_check", {}).get("shipped", "int8")
    return lowered, shipped, records if shipped == "int8" else [], report


def _verify(reference: Runner, lowered: Lowered, target: Target, precision: str, samples: Samples, options: BuildOptions,
            against: str, progress: Progress) -> Verification:
    """The artifact against its reference (the ``against`` model: source, compressed or fine-tuned); a failure raises."""
    with progress.stage(f"Verifying against the {against} model"):
        verification = verify_bytes(reference, lowered, target, options, criterion(target, precision, options), samples.verify_on)
    if not verification.passed:
        raise verification_error(verification, precision, fp32_instead_of_int8=precision != (options.precision or target.precision))
    return verification


def _html(report: dict[str, Any], lowered: Lowered, options: BuildOptions, out_dir: Path, progress: Progress) -> dict[str, bytes]:
    """report.html, when there is something to show: the device profile, the fine-tuning loss curve."""
    html = None
    if options.profile_device:
        with progress.stage(f"Profiling {lowered.primary} on {options.profile_device.name}"):
            report["profile"], html = profile_artifact(lowered, options, out_dir)
    if "finetune" in report:
        from edgec.report.training import with_training

        html = with_training(html.decode() if html else None, report["finetune"]).encode()
    return {"report.html": html} if html else {}
