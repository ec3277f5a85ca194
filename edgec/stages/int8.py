"""The int8 stage: recover accuracy, quantize and lower, keep float what must stay float, and
ship the faster of int8 and fp32 (edgec.stages.speed)."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.analysis import quantized_nodes
from edgec.errors import EdgecWarning, QuantizationError
from edgec.lower import Lowered, LowerOptions, background, lower, lower_ahead
from edgec.model import to_bytes
from edgec.passes.adaround import AdaRound
from edgec.passes.bias_correction import BiasCorrection
from edgec.passes.equalize import ActivationEqualization, CrossLayerEqualization
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.passes.quantize import CHECK_BATCHES, AccuracyGoal, QuantScheme
from edgec.profile import Device
from edgec.runtime import compare_threads
from edgec.runtime.ort import OrtRunner
from edgec.stages.context import INT8_OPTIONS, BuildOptions, Progress, SilentProgress
from edgec.stages.speed import speed_check, start_speed_check
from edgec.stages.verify import criterion, open_artifact
from edgec.targets import Target
from edgec.verify import InputSet, cosine, run_all

def lower_int8(model: ir.Model, stem: str, target: Target, calibration: InputSet, options: BuildOptions,
               progress: Progress, ranges: dict[str, list[float]] | None = None) -> tuple[Lowered, list[PassRecord], dict[str, Any]]:
    """Recover accuracy, quantize and lower; keep fp32 instead if int8 is slower here.

    ``ranges`` (ONNX value → [low, high]) are activation ranges quantization-aware training
    learned: they replace the calibrated ones, and the accuracy-recovery passes are skipped
    (QAT trained the weights for this very rounding; equalization would rescale the tensors
    the ranges were learned on). Returns the lowered artifact, the records of the
    accuracy-recovery passes, and report entries (calibration source, recovery decisions,
    speed check).
    """
    _refuse_quantized(model)
    extra: dict[str, Any] = {
        "calibration": {**calibration.to_dict(), "real_data": options.calib is not None},
        "int8_options": {k: _named(getattr(options, k)) for k in INT8_OPTIONS},
    }
    with background(model, target):
        if ranges:
            variants, extra["recovery"] = [(model.clone(), [])], {"skipped": "quantization-aware training"}
            extra["activation_ranges"] = {"source": "quantization-aware training", "tensors": len(ranges)}
        else:
            variants, extra["recovery"] = recover_accuracy(model, calibration, target.quantize, options, progress)
        lower_options = _int8_options(target, calibration, options, ranges)
        _start_ahead(model, variants, target, lower_options, options)
        lowered, records, errors = _most_accurate(model, variants, stem, target, lower_options, progress)
        if errors:  # variant 0 without bias correction, variant 1 with it
            extra["recovery"]["bias_correction"].update(applied=any(r.name == BiasCorrection.name for r in records),
                                                        int8_error={"without": errors["variant_0"], "with": errors["variant_1"]})
        built = lowered.details["int8_coverage"]
        if options.speed_check:
            lowered, extra["speed_check"] = speed_check(model, target, stem, lowered, options.speed_device, progress,
                                                        calibration.batches[0] if calibration.batches else None)
    extra["int8"] = int8_summary(built, extra.get("speed_check", {}).get("shipped", "int8"), _goal(target, options))
    return lowered, records, extra


def _start_ahead(model: ir.Model, variants: list[tuple[ir.Model, list[PassRecord]]], target: Target, lower_options: LowerOptions,
                 options: BuildOptions) -> None:
    """Start the lowerings this stage will need after the first variant's, in the order it
    needs them: the other recovery variants, then fp32 for the speed check."""
    for variant, _ in variants[1:]:
        lower_ahead(variant, target, dataclasses.replace(lower_options, goal=None))
    if options.speed_check:
        start_speed_check(model, target, options.speed_device)


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
        got = run_all(open_artifact(Path(tmp), lowered, target, threads=compare_threads(Path(lowered.primary).suffix)), batches)
    return float(np.mean([1.0 - cosine(reference[name], got[name]) for name in reference]))


def _refuse_quantized(model: ir.Model) -> None:
    quantized = quantized_nodes(model)
    if quantized:
        raise QuantizationError(
            f"The model is already quantized ({len(quantized)} quantized nodes, e.g. {quantized[:3]}); "
            "edgec quantizes float models.",
            hint="Give edgec the float model the quantized one was made from, or build this one with --precision fp32.",
        )


ADAROUND_SAMPLES = 16  # calibration batches AdaRound draws each layer's fitting rows from
EQUALIZATION_SAMPLES = 16  # calibration batches activation equalization measures channel ranges on


def recover_accuracy(
    model: ir.Model, calibration: InputSet, scheme: QuantScheme, options: BuildOptions, progress: Progress | None = None
) -> tuple[list[tuple[ir.Model, list[PassRecord]]], dict[str, Any]]:
    """The float-to-float passes that make a model quantize better, on copies of ``model``.

    Cross-layer equalization by default only for per-tensor weight schemes: with
    per-channel weights there is no weight range to balance, and moving scale into the
    activations made selfie_segmentation's int8 mask worse (cosine 0.93 → 0.88). With
    per-channel weights, activation equalization instead moves the scale of outlier
    activation channels into the next Conv's weights (BlazeFace all-int8, held-out
    classificators cosine 0.973 → 0.987 on ORT x86, 0.982 → 0.992 on TFLite). Bias
    correction cut MobileNetV2's ORT int8 error by 40% but hurt selfie_segmentation on
    TFLite, and a float simulation of int8 did not predict which, so by default both
    variants are returned for the build to lower and measure. Returns the variants (model,
    pass records) and what was decided.
    """
    progress = progress or SilentProgress()
    equalize = options.equalize if options.equalize is not None else not scheme.per_channel
    activations = options.equalize_activations if options.equalize_activations is not None else scheme.per_channel
    decisions: dict[str, Any] = {"equalization": {"applied": equalize}, "activation_equalization": {"applied": activations},
                                 "bias_correction": {"applied": bool(options.bias_correction)}}
    with progress.stage("Preparing for int8 (cross-layer equalization, bias correction)"):
        first = [CrossLayerEqualization(options.equalize_relu6)] if equalize else []
        if activations:
            first.append(ActivationEqualization(calibration.batches[:EQUALIZATION_SAMPLES]))
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


def _int8_options(target: Target, calibration: InputSet, options: BuildOptions,
                  ranges: dict[str, list[float]] | None = None) -> LowerOptions:
    scheme = target.quantize
    if options.calib_method:
        scheme = dataclasses.replace(scheme, method=options.calib_method)
    learned = tuple((name, float(low), float(high)) for name, (low, high) in sorted((ranges or {}).items()))
    return LowerOptions("int8", calibration, options.int8_io, scheme, _goal(target, options), tuple(options.keep_float), learned)


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
