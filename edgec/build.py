"""``edgec build``: load → canonicalize → lower → verify → write artifacts and report.

The build is deterministic: the same model, target, inputs and seed give byte-identical
artifacts and the same ``report.json`` (wall times are shown as progress, never recorded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from edgec import __version__
from edgec.analysis import quantized_nodes, summarize
from edgec.checks import at_least, one_of, option, within
from edgec.crash import at
from edgec.errors import DeviceError, EdgecWarning, ModelLoadError, QuantizationError, VerificationError
from edgec.images import ImagePreprocess
from edgec.lower import Lowered, LowerOptions, check_precision, lower
from edgec.model import load, load_proto, to_bytes
from edgec.outputs import OutputDir
from edgec.passes.canonicalize import canonicalize_passes
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.passes.adaround import AdaRound
from edgec.passes.bias_correction import BiasCorrection
from edgec.passes.equalize import CrossLayerEqualization
from edgec.passes.quantize import CALIBRATION_METHODS, CHECK_BATCHES, AccuracyGoal, QuantScheme
from edgec.profile import Device, ProfileSettings, compare_latency, foreign_device_warning, get_device, profile
from edgec.profile.kernels import compare_kernels, slower_in_int8
from edgec.recipe import Step, check_training_steps, make_passes, trains
from edgec.report import versions, write_json
from edgec.runtime import Runner, TensorSpec, compare_threads, open_runner
from edgec.runtime.ort import OrtRunner
from edgec.targets import Target, load_target, same_arch
from edgec.verify import Criterion, InputSet, Verification, compare, cosine, load_calibration, load_inputs, random_inputs, run_all


class Progress(Protocol):
    """How a build reports what it is doing (the CLI shows it; the API ignores it)."""

    def stage(self, description: str) -> contextlib.AbstractContextManager: ...

    def pass_done(self, record: PassRecord, seconds: float) -> None: ...

    # A progress may also have ``epoch(info)``, called after each fine-tuning epoch with
    # {"epoch", "epochs", "loss", "validation_loss", "metric", "seconds"} (edgec.train).


class SilentProgress:
    def stage(self, description: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def pass_done(self, record: PassRecord, seconds: float) -> None:
        pass


class _Marked:
    """Progress whose stages also mark where a bug strikes, for the crash message (edgec.crash)."""

    def __init__(self, shown: Progress):
        self.shown = shown

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        with at("stage", description), self.shown.stage(description):
            yield

    def pass_done(self, record: PassRecord, seconds: float) -> None:
        self.shown.pass_done(record, seconds)

    def epoch(self, info: dict) -> None:
        if hasattr(self.shown, "epoch"):
            self.shown.epoch(info)


@dataclasses.dataclass
class BuildOptions:
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    inputs: str | None = None  # .npz/.npy verification inputs; random when None
    max_samples: int | None = None
    tolerance: float | None = None  # overrides the target's max relative error
    min_cosine: float | None = None  # overrides the target's minimum cosine
    seed: int = 0
    precision: str | None = None  # fp32 / fp16 / int8; the target's when None
    # int8 calibration: .npz/.npy file, image folder, or a callable returning samples; random (with a warning) when None
    calib: str | Callable[[], Iterable[Any]] | None = None
    calib_samples: int = 128
    int8_io: bool = False  # int8 artifacts take and return int8 tensors instead of float
    images: ImagePreprocess = ImagePreprocess()  # how image folders given as inputs/calib become tensors
    calib_method: str | None = None  # minmax / percentile / entropy; the target's when None
    max_drop: float | None = None  # int8: largest top-1 drop (fraction) allowed on labeled calibration data
    keep_float: Sequence[str] = ()  # node names int8 builds must keep in float
    speed_check: bool = True  # int8: measure against fp32 on this host and ship the faster
    speed_device: str | Device | None = None  # ...on this inventory device instead (e.g. emulated-a76 for arm targets)
    # int8 accuracy recovery; None = edgec decides (see recover_accuracy)
    equalize: bool | None = None  # cross-layer equalization where it is exact (Relu/PRelu/LeakyRelu chains)
    equalize_relu6: bool = False  # ...and across ReLU6 too, replacing it by Relu (changes the function)
    bias_correction: bool | None = None  # cancel the mean output shift of weight rounding
    adaround: bool = False  # learn each weight's rounding on --calib (AdaRound) before bias correction
    # Compression passes run after canonicalization (pruning, factorization...; see edgec.recipe)
    recipe: Sequence[Step] = ()
    profile_device: str | Device | None = None  # profile the artifact on this device (report "profile" + report.html)
    devices: str | None = None  # device inventory file that names profile_device (targets/devices.toml otherwise)
    profile_settings: ProfileSettings | None = None  # how; defaults and the device's own threads otherwise

    def __post_init__(self) -> None:
        """A value out of range fails here, before any work (the CLI's options come here too)."""
        at_least(option("max_samples"), self.max_samples, 1)
        at_least(option("calib_samples"), self.calib_samples, 1)
        at_least(option("tolerance"), self.tolerance, 0)
        within(option("min_cosine"), self.min_cosine, 0, 1)
        within(option("max_drop"), self.max_drop, 0, 1, include_high=False)
        at_least(option("seed"), self.seed, 0)
        one_of(option("calib_method"), self.calib_method, CALIBRATION_METHODS)
        check_training_steps(self.recipe)


INT8_OPTIONS = ("calib_method", "max_drop", "keep_float", "speed_check", "speed_device", "equalize", "equalize_relu6",
                "bias_correction", "adaround")
RANDOM_CALIBRATION_WARNING = (
    "Calibrating with random inputs: activation ranges and statistics will not match real data, "
    "and int8 or compressed accuracy may suffer. Pass --calib with real samples."
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
    """Compile ``model_path`` for ``target`` into ``out_dir``; raise ``EdgecError`` on a user's
    error. Any other exception is a bug, marked with the stage, pass and node it struck in
    (``edgec.crash.where``); either way ``out_dir`` is left as it was."""
    options = options or BuildOptions()
    progress = _Marked(progress or SilentProgress())
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
         "bias_correction": "--bias-correction/--no-bias-correction"}  # where not --field-name


def _warn_ignored(options: BuildOptions, target: Target, precision: str) -> None:
    """Options given that this build will not use, said instead of silently dropped."""
    defaults = BuildOptions()
    given = [k for k in INT8_OPTIONS if getattr(options, k) != getattr(defaults, k)]
    ignored = given if precision != "int8" else [k for k in given if target.backend != "ort" and k in ORT_ONLY_OPTIONS]
    if ignored:
        why = f"a {precision} build" if precision != "int8" else f"the {target.backend} backend"
        warnings.warn(f"{', '.join(option(k, FLAGS.get(k)) for k in ignored)} {'does' if len(ignored) == 1 else 'do'} nothing in {why}; "
                      "ignored.", EdgecWarning, stacklevel=3)


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
    with progress.stage(f"Loading {path.name}"):
        model = load(path)
    model, records = canonicalize(model, options.input_shapes, progress)
    with progress.stage("Running the source model once in ONNX Runtime"):
        source = _runs(source_runner(path), model, options.seed)
    precision = options.precision or target.precision
    # Loaded on first use, once: only data-aware passes and int8 need it, or verification without --inputs.
    samples = functools.cache(functools.partial(_calibration, model, options))
    calibration = lambda: samples()[0]  # noqa: E731
    held_out = samples()[1] if options.calib and not options.inputs else None
    reference, extra, compressed = None, {}, {}  # the reference is the source file unless compressed
    if options.recipe:
        model, more, extra["compression"] = compress(model, options.recipe, calibration, source, options, progress, held_out)
        records += more
        reference = OrtRunner(to_bytes(model), threads=1, optimization="disabled")
        compressed[f"{path.stem}.{_compressed_kind(options.recipe)}.onnx"] = to_bytes(model)
        extra.update({"finetune": r.details for r in more if r.name == "finetune"})
    if precision == "int8":
        lowered, more, int8 = _lower_int8(model, path.stem, target, calibration(), options, progress)
        extra.update(int8)
        precision = int8.get("speed_check", {}).get("shipped", precision)
        if precision == "int8":  # a shipped fp32 artifact is lowered without the recovery passes
            records += more
    else:
        with progress.stage(f"Lowering for {target.name} ({target.backend}, {precision})"):
            lowered = lower(model, target, path.stem, LowerOptions(precision))
    with progress.stage("Verifying against the " + (_compressed_kind(options.recipe) if compressed else "source") + " model"):
        verification = verify_bytes(reference or source, lowered, target, options, criterion(target, precision, options), held_out)
    if not verification.passed:
        raise _verification_error(verification, fp32_instead_of_int8=precision != (options.precision or target.precision))
    report = _report(path, target, model, records, lowered, verification, options)
    report["precision"] = precision
    report.update(extra)
    files = {**lowered.files, **compressed}
    if options.profile_device:
        with progress.stage(f"Profiling {lowered.primary} on {options.profile_device.name}"):
            report["profile"], files["report.html"] = _profile(lowered, options, out.path)
    if "finetune" in report:
        from edgec.report.training import with_training

        files["report.html"] = with_training(files.get("report.html", b"").decode() or None, report["finetune"]).encode()
    files["report.json"] = write_json(report)
    written = out.commit(files, last="report.json")
    return BuildResult(report, written[:-1], out.path / "report.json", verification)


def _runs(source: Runner, model: ir.Model, seed: int) -> Runner:
    """``source``, once it ran the first random verification batch: a model the ONNX checker
    passes can still hold a node ONNX Runtime refuses (a Conv with group 0, a Gemm bias that
    does not broadcast), and that is the model's fault, to be said before any lowering."""
    source.run(random_inputs(input_specs(model), seed=seed, count=1).batches[0])
    return source


def input_specs(model: ir.Model) -> list[TensorSpec]:
    """The (static, canonical) inputs of ``model`` as runners describe them."""
    return [TensorSpec(v.name, tuple(v.shape.numpy()), v.dtype.numpy()) for v in model.graph.inputs]


def _profile(lowered: Lowered, options: BuildOptions, out_dir: Path) -> tuple[dict[str, Any], bytes]:
    """Measure the primary artifact on the asked device: the measurement and its report.html."""
    from edgec.report.profile import profile_report, render_html

    settings = options.profile_settings or ProfileSettings(seed=options.seed)  # the device's own threads
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as tmp:
        path = Path(tmp) / lowered.primary
        path.write_bytes(lowered.files[lowered.primary])
        measurement = profile(path, options.profile_device, settings)
    measurement["artifact"]["path"] = str(out_dir / lowered.primary)
    return measurement, render_html(profile_report([measurement], settings)).encode()


def canonicalize(
    model: ir.Model, input_shapes: Mapping[str, Sequence[int]], progress: Progress | None = None
) -> tuple[ir.Model, list[PassRecord]]:
    progress = progress or SilentProgress()
    with progress.stage("Canonicalizing (shapes, constant folding, BatchNorm folding)"):
        return Pipeline(canonicalize_passes(input_shapes), observer=progress.pass_done)(model)


def compress(model: ir.Model, steps: Sequence[Step], calibration: Callable[[], InputSet], source: Runner, options: BuildOptions,
             progress: Progress, held_out: InputSet | None = None) -> tuple[ir.Model, list[PassRecord], dict[str, Any]]:
    """Run the recipe's passes and measure what they cost: MACs and parameters before and
    after, and how far the compressed model's outputs moved from the source's on the
    verification inputs (the artifact is then verified against the compressed model)."""
    before = summarize(model)
    training = _training_context(model, options, progress) if trains(steps) else None
    with progress.stage(f"Compressing ({', '.join(s.name for s in steps)})"):
        model, records = Pipeline(make_passes(steps, calibration, training), progress.pass_done)(model)
    after = summarize(model)
    with progress.stage("Measuring the compressed model against the source"):
        compressed = OrtRunner(to_bytes(model), threads=1, optimization="disabled")
        error = compare(source, compressed, _inputs(compressed, options, held_out), Criterion())
    return model, records, {
        "steps": [s.to_dict() for s in steps],
        "macs": {"before": before["macs"], "after": after["macs"]},
        "params": {"before": before["params"], "after": after["params"]},
        "mac_reduction": round(1 - after["macs"] / before["macs"], 6) if before["macs"] else 0.0,
        "vs_source": error.to_dict(),
    }


def _training_context(source: ir.Model, options: BuildOptions, progress: Progress):
    """What fine-tuning steps distill from (the model before compression) and report to."""
    from edgec.train import TrainingContext

    def read(path: str, specs: list[TensorSpec]) -> InputSet:
        return load_inputs(path, specs, images=options.images)

    return TrainingContext(to_bytes(source), read, options.seed, getattr(progress, "epoch", None))


def _compressed_kind(steps: Sequence[Step]) -> str:
    return "finetuned" if trains(steps) else "compressed"


def _lower_int8(model: ir.Model, stem: str, target: Target, calibration: InputSet, options: BuildOptions,
                progress: Progress):
    """Recover accuracy, quantize and lower; keep fp32 instead if int8 is slower here.

    Returns the lowered artifact, the records of the accuracy-recovery passes, and report
    entries (calibration source, recovery decisions, speed check).
    """
    _refuse_quantized(model)
    extra: dict[str, Any] = {
        "calibration": {**calibration.to_dict(), "real_data": options.calib is not None},
        "int8_options": {k: _named(getattr(options, k)) for k in INT8_OPTIONS},
    }
    variants, extra["recovery"] = recover_accuracy(model, calibration, target.quantize, options, progress)
    lowered, records, errors = _most_accurate(model, variants, stem, target, _int8_options(target, calibration, options), progress)
    if errors:  # variant 0 without bias correction, variant 1 with it
        extra["recovery"]["bias_correction"].update(applied=any(r.name == BiasCorrection.name for r in records),
                                                    int8_error={"without": errors["variant_0"], "with": errors["variant_1"]})
    built = lowered.details["int8_coverage"]
    if options.speed_check:
        device = options.speed_device
        measurable = device is not None or same_arch(platform.machine(), target.arch)
        with progress.stage(_speed_check_stage(device)) if measurable else contextlib.nullcontext():
            lowered, extra["speed_check"] = choose_faster(model, target, stem, lowered, device)
    extra["int8"] = int8_summary(built, extra.get("speed_check", {}).get("shipped", "int8"), _goal(target, options))
    return lowered, records, extra


def int8_summary(built: dict[str, Any], shipped: str, goal: AccuracyGoal | None) -> dict[str, Any]:
    """What an int8 request got: the precision shipped, the share of MACs the shipped artifact
    runs in int8 (0 when the speed check shipped fp32), and the int8 artifact built (its
    float layers and why). Warns when that artifact keeps most of its MACs float."""
    summary = {"shipped": shipped, "int8_macs_fraction": built["int8_macs_fraction"] if shipped == "int8" else 0.0,
               "int8_artifact": built}
    fraction = built["int8_macs_fraction"]
    if fraction is not None and fraction < MOSTLY_FLOAT:
        summary["warning"] = _mostly_float(built, goal)
        warnings.warn(summary["warning"], EdgecWarning, stacklevel=5)
    return summary


MOSTLY_FLOAT = 0.5  # an int8 artifact with less than this share of its MACs in int8 is mostly float, and said so


def _mostly_float(built: dict[str, Any], goal: AccuracyGoal | None) -> str:
    """The warning for a mostly-float int8 artifact: how much stayed float, and why."""
    layers = built["float_layers"]
    reasons: dict[str, int] = {}
    for layer in layers:
        reasons[layer["why"]] = reasons.get(layer["why"], 0) + 1
    why = ", ".join(f"{count} kept by the {reason}" if reason == "precision search" else f"{count} {reason}"
                    for reason, count in sorted(reasons.items()))
    check, searched = built.get("all_int8_check"), ""
    if check and goal is not None:
        drops = "" if goal.max_top1_drop is None else "".join(
            f", top-1 drop {d:.3f} (allowed {goal.max_top1_drop:g})" for d in check["top1_drop"].values())
        searched = (f" All-int8 reached cosine {min(check['cosine'].values()):.4f}{drops} on the calibration samples, short of "
                    f"the search's goal of cosine ≥ {goal.min_cosine:g} (the int8 criterion with headroom).")
    return (f"The int8 artifact runs only {built['int8_macs_fraction']:.0%} of its {built['macs']:,} MACs in int8: {len(layers)} "
            f"MAC layers stay float ({why}).{searched} It is mostly a float model; lower --min-cosine/--max-drop to accept "
            "more int8 error, or build --precision fp32.")


def _speed_check_stage(device: Device | None) -> str:
    """What the speed check really does: time here or on a board, or count emulated instructions."""
    if device is None:
        return "Timing int8 against fp32 on this host"
    if device.emulation is not None:
        return f"Counting instructions of int8 and fp32 on emulated device {device.name}"
    return f"Timing int8 against fp32 on device {device.name}"


def _unmeasured(target: Target) -> dict[str, Any]:
    """The speed check's record when nothing here can run the target's code, and a warning saying so."""
    reason = f"this host is {platform.machine()}, the target {target.arch}"
    warnings.warn(f"The int8 artifact's speed was not checked against fp32 ({reason}); int8 is shipped unmeasured. "
                  "Pass --speed-check-on DEVICE to check on a device of the target's architecture (e.g. emulated-a76), "
                  "or --no-speed-check to ship int8 without this warning.", EdgecWarning, stacklevel=5)
    return {"shipped": "int8", "measured": False, "reason": f"{reason}; --speed-check-on DEVICE checks on one"}


def _named(value: Any) -> Any:
    """A report value: devices by name."""
    return value.name if isinstance(value, Device) else value


def _most_accurate(source: ir.Model, variants: list[tuple[ir.Model, list[PassRecord]]], stem: str, target: Target,
                   lower_options: LowerOptions, progress: Progress) -> tuple[Lowered, list[PassRecord], dict[str, float]]:
    """Lower each variant to int8 and keep the one whose outputs stay closest to ``source``
    on calibration data (1 − cosine, averaged over outputs), measured with the target's
    runtime. Variants are compared fully quantized; the winner then gets the precision search
    (without a goal, the artifact already lowered is the answer)."""
    if len(variants) == 1:
        with progress.stage(f"Quantizing and lowering for {target.name} ({target.backend}, int8)"):
            return lower(variants[0][0], target, stem, lower_options), variants[0][1], {}
    plain = dataclasses.replace(lower_options, goal=None)
    batches = lower_options.calibration.batches[:CHECK_BATCHES]
    reference = run_all(OrtRunner(to_bytes(source), threads=1, optimization="disabled"), batches)
    candidates = []
    for i, (variant, records) in enumerate(variants):
        with progress.stage(f"Measuring int8 error of recovery variant {i + 1}/{len(variants)}"):
            lowered = lower(variant, target, stem, plain)
            candidates.append((_int8_error(reference, lowered, target, batches), i, lowered, variant, records))
    _, _, lowered, model, records = min(candidates, key=lambda c: c[:2])
    if lower_options.goal is not None:
        with progress.stage(f"Quantizing and lowering for {target.name} ({target.backend}, int8)"):
            lowered = lower(model, target, stem, lower_options)
    return lowered, records, {f"variant_{c[1]}": round(c[0], 6) for c in candidates}


def _int8_error(reference: dict[str, np.ndarray], lowered: Lowered, target: Target, batches: list) -> float:
    with tempfile.TemporaryDirectory(prefix="edgec-check-") as tmp:
        got = run_all(_open(Path(tmp), lowered, target, threads=compare_threads(Path(lowered.primary).suffix)), batches)
    return float(np.mean([1.0 - cosine(reference[name], got[name]) for name in reference]))


def _refuse_quantized(model: ir.Model) -> None:
    quantized = quantized_nodes(model)
    if quantized:
        raise QuantizationError(
            f"The model is already quantized ({len(quantized)} quantized nodes, e.g. {quantized[:3]}); "
            "edgec quantizes float models.",
            hint="Give edgec the float model the quantized one was made from, or build this one with --precision fp32.",
        )


def _calibration(model: ir.Model, options: BuildOptions) -> tuple[InputSet, InputSet | None]:
    """Calibration samples from ``--calib``, or seeded random ones with a warning; and, when
    ``--calib`` is given without ``--inputs``, the samples held back from it to verify on."""
    specs = input_specs(model)
    if options.calib:
        loaded = load_calibration(options.calib, specs, limit=options.calib_samples, images=options.images)
        return (loaded, None) if options.inputs else held_out_split(loaded, options.seed)
    warnings.warn(RANDOM_CALIBRATION_WARNING, EdgecWarning, stacklevel=5)
    # seed + 1: a different stream from the random verification inputs.
    return random_inputs(specs, seed=options.seed + 1, count=options.calib_samples), None


HELD_OUT_EVERY = 4  # one calibration batch in this many verifies the artifact when no --inputs are given


def held_out_split(samples: InputSet, seed: int) -> tuple[InputSet, InputSet]:
    """(calibration, verification): a seeded choice of one batch in ``HELD_OUT_EVERY`` (at
    least one) held back from ``samples``, so an artifact is verified on real data it was not
    calibrated on, not on random noise far outside its calibrated ranges (a MobileNetV3-style
    net: cosine 0.106 on noise, 0.9997 on real data). A single batch both calibrates and verifies."""
    count = len(samples.batches)
    if count < 2:
        return samples, _subset(samples, [0], f"the only calibration batch ({samples.source}; too few to hold one back)")
    chosen = np.random.default_rng(seed).permutation(count)[: max(1, count // HELD_OUT_EVERY)]
    held = sorted(int(i) for i in chosen)
    kept = [i for i in range(count) if i not in set(held)]
    return (_subset(samples, kept, f"{samples.source}, less {len(held)} held out"),
            _subset(samples, held, f"held-out calibration samples ({len(held)} of {samples.source}, seed {seed})"))


def _subset(samples: InputSet, indices: Sequence[int], source: str) -> InputSet:
    """The batches of ``samples`` at ``indices``, with their labels."""
    labels = samples.labels
    if labels is not None:
        per = len(labels) // len(samples.batches)
        labels = np.concatenate([labels[i * per:(i + 1) * per] for i in indices])
    return InputSet([samples.batches[i] for i in indices], source, labels)


ADAROUND_SAMPLES = 16  # calibration batches AdaRound draws each layer's fitting rows from


def recover_accuracy(
    model: ir.Model, calibration: InputSet, scheme: QuantScheme, options: BuildOptions, progress: Progress | None = None
) -> tuple[list[tuple[ir.Model, list[PassRecord]]], dict[str, Any]]:
    """The float-to-float passes that make a model quantize better, on copies of ``model``.

    Cross-layer equalization by default only for per-tensor weight schemes: with
    per-channel weights there is no weight range to balance, and moving scale into the
    activations made selfie_segmentation's int8 mask worse (cosine 0.93 → 0.88). Bias
    correction cut MobileNetV2's ORT int8 error by 40% but hurt selfie_segmentation on
    TFLite, and a float simulation of int8 did not predict which, so by default both
    variants are returned for the build to lower and measure. Returns the variants (model,
    pass records) and what was decided.
    """
    progress = progress or SilentProgress()
    equalize = options.equalize if options.equalize is not None else not scheme.per_channel
    decisions: dict[str, Any] = {"equalization": {"applied": equalize}, "bias_correction": {"applied": bool(options.bias_correction)}}
    with progress.stage("Preparing for int8 (cross-layer equalization, bias correction)"):
        first = [CrossLayerEqualization(options.equalize_relu6)] if equalize else []
        if options.adaround:
            first.append(AdaRound(calibration.batches[:ADAROUND_SAMPLES], scheme.weight_qmax))
        base = Pipeline(first, progress.pass_done)(model.clone())
        if options.bias_correction is False:
            return [base], decisions
        correct = Pipeline([BiasCorrection(calibration.batches, scheme.weight_qmax, scheme.per_channel)], progress.pass_done)
        corrected, more = correct(base[0].clone())
    if options.bias_correction is None:
        return [base, (corrected, base[1] + more)], decisions
    return [(corrected, base[1] + more)], decisions


def _int8_options(target: Target, calibration: InputSet, options: BuildOptions) -> LowerOptions:
    scheme = target.quantize
    if options.calib_method:
        scheme = dataclasses.replace(scheme, method=options.calib_method)
    return LowerOptions("int8", calibration, options.int8_io, scheme, _goal(target, options), tuple(options.keep_float))


def _goal(target: Target, options: BuildOptions) -> AccuracyGoal | None:
    """What the precision search aims at; None (everything int8) when nothing is required
    (``--min-cosine 0`` and no ``--max-drop``)."""
    min_cosine = criterion(target, "int8", options).min_cosine or 0.0
    if min_cosine <= 0 and options.max_drop is None:
        return None
    return AccuracyGoal(_with_headroom(min_cosine), options.max_drop)


def _with_headroom(min_cosine: float) -> float:
    """The cosine the precision search demands on calibration data: three quarters of the
    way from the verification criterion to 1, since held-out data will not match as well
    (half-way left blazeface and palm_detection at 0.989-0.990 on held-out photos)."""
    return 0.0 if min_cosine <= 0 else 1.0 - (1.0 - min_cosine) / 4


def choose_faster(model: ir.Model, target: Target, stem: str, int8: Lowered,
                  device: Device | None = None) -> tuple[Lowered, dict[str, Any]]:
    """Keep the int8 artifact only if it is faster than fp32 here, or on ``device``; say which and why.

    An emulated device is judged by instructions per inference (deterministic; its wall time
    is not latency). When fp32 wins here, both artifacts' kernels are profiled and the ones
    int8 loses on are named. Without a device of the target's architecture the int8 artifact
    is kept, with a warning, and the report says the check was not possible.
    """
    if device is None and not same_arch(platform.machine(), target.arch):
        return int8, _unmeasured(target)
    fp32 = lower(model, target, stem, LowerOptions("fp32"))
    with tempfile.TemporaryDirectory(prefix="edgec-speed-") as tmp:
        paths = {name: _write(Path(tmp) / name, lowered) for name, lowered in (("fp32", fp32), ("int8", int8))}
        decision = _time_on_device(paths, device) if device else _time_here(paths, target)
        unit = decision["metric"]
        if decision[f"int8_{unit}"] < decision[f"fp32_{unit}"]:
            return int8, {"shipped": "int8", **decision}
        if device is None:
            runs = max(3, min(HOST_SPEED_RUNS, int(HOST_SPEED_BUDGET_S * 1e3 / decision["fp32_ms"])))
            decision["kernels"] = compare_kernels(paths["fp32"], paths["int8"], target.threads, runs)
    _warn_fp32_shipped(decision)
    return fp32, {"shipped": "fp32", **decision}


def _warn_fp32_shipped(decision: dict[str, Any]) -> None:
    unit, slower = decision["metric"], slower_in_int8(decision.get("kernels", []))
    warnings.warn(
        f"The int8 artifact is not faster than fp32 on {decision['on']} ({decision[f'int8_{unit}']:.4g} vs "
        f"{decision[f'fp32_{unit}']:.4g} {SPEED_UNITS[unit]}, {decision['threads']} threads)"
        f"{f'; slower in int8: {slower}' if slower else ''}. The fp32 artifact was built instead. "
        "Pass --no-speed-check to ship int8 anyway.",
        EdgecWarning,
        stacklevel=4,
    )


SPEED_UNITS = {"ms": "ms", "instructions": "instructions per inference"}
# Per artifact and round: 20 runs of a small model; of a large one (100+ ms a run) what fits
# in the budget, so timing a 3-GMAC detector takes seconds, not a minute.
HOST_SPEED_RUNS, HOST_SPEED_ROUNDS, HOST_SPEED_BUDGET_S, HOST_SPEED_WARMUP = 20, 3, 1.5, 3
DEVICE_SPEED_ROUNDS, DEVICE_SPEED_SETTINGS = 3, ProfileSettings(warmup=3, runs=20, ops=False)
# Emulated wall time is not latency; the instruction count is taken apart from the timed runs.
EMULATED_SPEED_SETTINGS = ProfileSettings(warmup=0, runs=1, ops=False)


def _time_here(paths: dict[str, Path], target: Target) -> dict[str, Any]:
    """Alternating rounds of both artifacts in this process, at the target's threads."""
    runners = {name: open_runner(path, threads=target.threads, options=target.runtime) for name, path in paths.items()}
    latency = compare_latency(runners, HOST_SPEED_RUNS, HOST_SPEED_ROUNDS, HOST_SPEED_BUDGET_S, HOST_SPEED_WARMUP)
    return {"measured": True, "on": "this host", "metric": "ms", "threads": target.threads,
            **{f"{name}_ms": round(latency[name]["best_median_ms"], 4) for name in paths}}


def _time_on_device(paths: dict[str, Path], device: Device) -> dict[str, Any]:
    """Both artifacts on ``device``: instructions per inference on an emulated core (they are
    deterministic), else the best median latency of alternating rounds."""
    decision = {"measured": True, "on": f"device {device.name}", "threads": device.threads}
    if device.emulation is not None:
        costs = {name: profile(path, device, EMULATED_SPEED_SETTINGS)["cost"] for name, path in paths.items()}
        return {**decision, "metric": "instructions", **{f"{name}_instructions": c["instructions"] for name, c in costs.items()}}
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(DEVICE_SPEED_ROUNDS):
        for name, path in paths.items():
            medians[name].append(profile(path, device, DEVICE_SPEED_SETTINGS)["latency_ms"]["median"])
    return {**decision, "metric": "ms", **{f"{name}_ms": round(min(m), 4) for name, m in medians.items()}}


def _open(directory: Path, lowered: Lowered, target: Target, threads: int) -> Runner:
    """A runner on the primary artifact, written to a scratch ``directory``. edgec made the
    artifact, so a runtime refusing it is a bug in edgec, not the user's error."""
    try:
        return open_runner(_write(directory, lowered), threads=threads, options=target.runtime)
    except ModelLoadError as exc:
        raise RuntimeError(f"the runtime cannot load edgec's own {lowered.primary}: {exc}") from exc


def _write(directory: Path, lowered: Lowered) -> Path:
    """The primary artifact, written to a scratch ``directory``."""
    directory.mkdir(exist_ok=True)
    path = directory / lowered.primary
    path.write_bytes(lowered.files[lowered.primary])
    return path


def criterion(target: Target, precision: str, options: BuildOptions) -> Criterion:
    """The target's verification criterion for ``precision``, with the user's overrides."""
    chosen = target.criteria[precision]
    if options.tolerance is not None:
        chosen = dataclasses.replace(chosen, tolerance=options.tolerance)
    if options.min_cosine is not None:
        chosen = dataclasses.replace(chosen, min_cosine=options.min_cosine)
    return chosen


def verify_bytes(reference: Runner, lowered: Lowered, target: Target, options: BuildOptions, criterion: Criterion,
                 held_out: InputSet | None = None) -> Verification:
    """Write the primary artifact to a scratch file and compare it with the reference model."""
    with tempfile.TemporaryDirectory(prefix="edgec-verify-") as tmp:
        artifact = _open(Path(tmp), lowered, target, threads=compare_threads(Path(lowered.primary).suffix))
        return verify_runners(reference, artifact, options, criterion, held_out)


def source_runner(path: Path) -> Runner:
    """The reference: the user's own file in ONNX Runtime with graph optimizations off."""
    proto = load_proto(path)
    return OrtRunner(proto.SerializeToString(), threads=1, optimization="disabled", user_file=path.name)


def verify_runners(source: Runner, artifact: Runner, options: BuildOptions, criterion: Criterion,
                   held_out: InputSet | None = None) -> Verification:
    inputs = _inputs(artifact, options, held_out)
    return compare(source, artifact, inputs, criterion)


def _inputs(artifact: Runner, options: BuildOptions, held_out: InputSet | None = None) -> InputSet:
    """``--inputs``; else the calibration samples held back for verification; else seeded random data."""
    # The artifact's specs are static and named as in the source, so data is made from them.
    if options.inputs:
        return load_inputs(options.inputs, artifact.inputs, limit=options.max_samples, images=options.images)
    if held_out is not None:
        return _subset(held_out, range(min(options.max_samples or len(held_out.batches), len(held_out.batches))), held_out.source)
    return random_inputs(artifact.inputs, seed=options.seed)


def _verification_error(v: Verification, fp32_instead_of_int8: bool = False) -> VerificationError:
    failed = next(o for o in v.outputs if not o.passed)
    shipped = (" The speed check built fp32 because int8 was not faster, and fp32 is held to the fp32 "
               "criterion; --no-speed-check keeps int8.") if fp32_instead_of_int8 else ""
    return VerificationError(
        f"The artifact does not match the source model: output '{failed.name}' has max abs error "
        f"{failed.max_abs_error:.3g} (max |reference| {failed.max_abs_reference:.3g}, relative "
        f"{failed.relative_error:.3g}) and cosine {failed.cosine:.4f}; required: {v.criterion.describe()}; "
        f"nothing was written.{shipped}",
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
        "notes": [r.details["note"] for r in records if "note" in r.details],  # also shown as warnings
        "passes": [r.to_dict() for r in records],
        "lowering": lowered.details,
        "artifacts": [
            {"file": name, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in lowered.files.items()
        ],
        "verification": verification.to_dict(),
        "versions": versions(),
    }
