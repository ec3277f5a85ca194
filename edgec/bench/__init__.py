"""``make bench``: build the zoo, time what was built, and write one JSON file.

Sections of the JSON:

* ``results``: every zoo model × target in fp32: build time, artifact sizes, and the
  single-thread latency of the source model in ONNX Runtime next to the artifact's.
* ``tflite_int8``: zoo models with a calibration split, edgec's fp32 vs full-integer int8
  TFLite: latency, size, held-out accuracy, the kernels int8 is slower in, XNNPACK partitions
  and the op types kept float so XNNPACK runs the int8 graph in one piece.
* ``ort_int8``: the same for ONNX Runtime on x86 (QDQ, u8 activations / 7-bit s8 weights),
  with the tensors the precision search kept float.
* ``int8_recovery``: MobileNetV2 in int8 with and without cross-layer equalization and
  bias correction, on both runtimes: held-out cosine, mean error and top-1.
* ``pruning``: digits classifiers on ORT x86 with 30% of the MACs removed by channel
  pruning (with and without reconstruction) and with 50% magnitude sparsity: held-out
  top-1, artifact size raw and deflated (what a zip or an app store download gives), and
  latency against the unpruned artifact in the same process.
* ``arm_int8_cost``: edgec's fp32 and int8 ``.tflite`` (tflite-arm; int8 at the target's
  criterion, as a default build makes it) and onnx2tf's int8 file of the same model (when
  onnx2tf is installed) on the emulated Cortex-A53 and Cortex-A76 devices (``make
  arm-emulator``): instructions per inference counted by qemu, deterministic where wall time
  under emulation means nothing, the int8 MAC share and the op types edgec kept float;
  skipped without the emulator.
* ``factorization``: trained classifiers with 30% fewer MACs by low-rank factorization,
  plain and data-aware (fitted on the calibration split), on ONNX Runtime x86: held-out
  top-1 of the source and of each, and latency against the unfactorized build.
* ``round_trip``: production ``.tflite`` files taken through tf2onnx to ONNX and back
  through edgec, against the original file: the zoo's conversion (tf2onnx with the zoo's
  fixes) and a plain tf2onnx run, when tf2onnx is installed. Their ratios are the median over
  rounds of same-round ratios, each round on new interpreter instances.
* ``onnx2tf``: the field's standard converter on the same models, when it is installed
  (``pip install -e '.[compare]'``): which models it converts, and its fp32/int8 latency
  next to edgec's where both convert.
* ``int8_quality``: every zoo model with a calibration split, int8 on tflite-x86 and ort-x86
  at the target's criterion (precision search on, speed check off), calibrated with
  ``minmax`` and with ``mse`` ranges, without activation equalization and with AdaRound: the
  fraction of MACs in int8, the lowest output cosine on the held-out split, the top-1 drop
  and the build's wall time (noisy: other work shares the machine).
* ``build_time``: how long edgec itself takes: the large detector and two small zoo models,
  fp32 and int8 (calibrated on the zoo's calibration split, the target's criterion, speed
  check on: the build a user runs), for ORT and TFLite on x86. Each build runs in a fresh
  process (``edgec.bench.timing``); the row holds wall time per build stage, the build's and
  the process's wall time (the difference is start-up: imports), CPU time of all its threads,
  its peak RSS, and the verification verdict.
* ``finetune``: recovery by training (``--finetune``). Digits classifiers with 50% fewer
  MACs by channel pruning, int8 TFLite, one-shot vs fine-tuned on the zoo's training split
  (remade from scikit-learn's digits by ``models/digits.py``; the section is skipped without
  scikit-learn): held-out top-1 against the fp32 source, and the fine-tuned build's wall
  time; and the same with the channels chosen by learned gates (``importance = "gates"``)
  instead of weight norms, at the same MAC reduction. Per digits classifier also two
  weight-only rows against the unconstrained artifact: gradual magnitude pruning to 50%
  sparsity (int8) and clustering to 16 values (fp32), each with held-out top-1 and the
  zlib-deflated .tflite size (what a zip gives), and a quantization-aware training row per
  x86 target (the unpruned model, all-int8: post-training vs QAT top-1 against the fp32
  source). Production models with 30% fewer MACs, distilled without labels on the
  calibration photos: every output's cosine to the source on the held-out photos, one-shot,
  fine-tuned, and fine-tuned after pruning by learned gates; and the same 30% by
  factorization instead of pruning, one-shot and fine-tuned.
* ``predictor``: per device with a fitted latency predictor (``edgec device calibrate D``,
  in the cache folder), its end-to-end predictions for the zoo models in fp32 and int8
  (``.tflite`` for the device's architecture) and the pretrained originals, against
  measurements taken the way calibration measures (best round's 10th percentile here, instructions per
  inference on emulated cores): RMSPE and the share within ±10%, overall and per precision.
  The zoo is split in two by model: each half is predicted by a fit on the calibration
  samples plus the other half (edgec/predict/evaluate.py); a pretrained model by the fit
  that did not see its zoo twin.
* ``optimize``: ``edgec optimize`` (greedy, 40 trials at most, ``--max-drop 0.01`` on the
  held-out split, ``--finetune`` on the digits training split for ``OPTIMIZE_FINETUNE``'s 20
  epochs, which greedy turns on where one-shot moves lose too much) on the digits
  classifiers, on ``local`` (ort-x86) and ``emulated-a76`` (tflite-arm; skipped without the
  emulator), for ``--speedup 2``, ``--speedup 3`` and a size budget of a third of the
  target's fp32 artifact: the chosen point, its cost re-measured
  apart from the search (new runners in alternating rounds against the bench's own fp32
  build; instructions counted again), its top-1 drop, and the baselines the search ran:
  uniform-rate pruning at the chosen point's cost (and at its MACs) and int8 alone.
* ``optimize_time``: 40 NSGA-II trials on ``local`` for each digits classifier
  (``--speedup 3``, so the search never stops early): wall seconds, against the 15 minutes it must fit in.
* ``scale``: the same search (NSGA-II, optimize's default 40 trials, 4 in flight, a MACs budget,
  tflite-arm priced on ``emulated-a76``, whose counts run as parallel tasks; ``local`` timing
  is one measurement at a time by design, and small ORT candidates build in about a second,
  less than Ray's start) with ``--executor local`` and with ``--executor ray`` on a local Ray of this
  machine's CPUs (its start included): wall seconds of each, their ratio, and whether both
  chose the same settings.
* ``node_tests``: ONNX's own operator tests (``edgec.bench.node_tests``, from the pinned onnx
  wheel), each built for tflite-x86 and ort-x86 with its own inputs, in fp32 and in int8
  calibrated on them: how many give ONNX's
  expected outputs, are refused with a message (by error class), fail verification, and by
  name any that end in an internal error, a dead process or a timeout, which must be none.
* ``summary``: the ratios those sections are read for.

Latencies that are compared are measured in the same process in alternating rounds and
compared by their quietest round (``compare``), so their ratios mean something on a noisy
machine. TFLite runs single-threaded
with XNNPACK. Everything runs on this host (``measured_on``); ARM targets' artifacts run here
too, which proves they load and compute, while their ARM speed is the profiler's job.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import time
import warnings
import zlib
from pathlib import Path

import numpy as np

from edgec.bench import onnx2tf
from edgec.bench.timing import timed_build
from edgec.build import BuildOptions, BuildResult, build
from edgec.errors import BudgetError, EdgecError
from edgec.images import ImagePreprocess
from edgec.model import load
from edgec.predict import PredictorMissing, PredictorStore, cache_dir
from edgec.predict.evaluate import Measured, accuracy, cross_validate
from edgec.predict.calibrate import TFLITE_TARGETS
from edgec.predict.measure import measure_batch
from edgec.profile import ProfileSettings, compare_latency, get_device, profile
from edgec.profile.emulator import setup_problem
from edgec.profile.kernels import compare_kernels, int8_losses
from edgec.recipe import Step
from edgec.report import versions
from edgec.runtime import open_runner
from edgec.runtime.litert import LiteRTRunner
from edgec.runtime.ort import OrtRunner
from edgec.search import Budgets, OptimizeOptions, optimize
from edgec.search.cost import local_latency
from edgec.stages.source import input_specs
from edgec.targets import known_targets, load_target
from edgec.verify import load_calibration

REPO = Path(__file__).resolve().parents[2]
# int8_quality's variants: activation ranges, activation equalization (on by default) and weight rounding, each alone.
INT8_QUALITY_VARIANTS = {"minmax": {"calib_method": "minmax"}, "mse": {"calib_method": "mse"},
                         "no_activation_equalization": {"calib_method": "minmax", "equalize_activations": False},
                         "adaround": {"calib_method": "minmax", "adaround": True}}
TFLITE_TARGET = "tflite-x86"  # the host's own TFLite target, for the TFLite-only sections
ORT_TARGET = "ort-x86"
PRUNING_VARIANTS = {
    "pruned": [Step("prune", {"mac_reduction": 0.3})],
    "pruned_no_reconstruction": [Step("prune", {"mac_reduction": 0.3, "reconstruct": False})],
    "sparse_50": [Step("sparsify", {"sparsity": 0.5})],
}
ARM_TARGET = "tflite-arm"
ARM_DEVICES = ("emulated-a53", "emulated-a76")  # no dot-product instructions / with them
RECOVERY_VARIANTS = {
    "neither": {"equalize": False, "bias_correction": False},
    "equalization": {"equalize": True, "equalize_relu6": True, "bias_correction": False},
    "bias_correction": {"equalize": False, "bias_correction": True},
    "both": {"equalize": True, "equalize_relu6": True, "bias_correction": True},
}
FACTORIZATION = {"mac_reduction": 0.3}
ROUND_TRIP_ROUNDS = 10  # new interpreters each round: one instance's memory placement moved latency by up to 8%
BUILD_TIME_MODELS = ("detector", "mobilenetv2", "blazeface")
BUILD_TIME_TARGETS = (ORT_TARGET, TFLITE_TARGET)
# Fine-tuning: (MAC reduction, fine-tuning options) for the labeled digits and the unlabeled photos.
FINETUNE_DIGITS = (0.5, {"epochs": 40, "lr": 3e-3, "patience": 40, "schedule": "cosine", "warmup": 0.05, "budget_s": 150})
# Weights only, no channel removal: gradual magnitude pruning to this sparsity (int8), clustering to this many values (fp32).
FINETUNE_SPARSE = {"sparsity": 0.5, "epochs": 20, "lr": 1e-3, "patience": 20, "schedule": "cosine", "warmup": 0.05}
FINETUNE_CLUSTERS = {"clusters": 16, "epochs": 5, "lr": 1e-4}
FINETUNE_QAT = {"qat": True, "epochs": 2, "lr": 1e-4, "patience": 2, "schedule": "cosine", "warmup": 0.05}
FINETUNE_PHOTOS = (0.3, {"epochs": 30, "lr": 3e-4, "batch_size": 4, "mix": 8, "patience": 30, "validation": 0.2, "schedule": "cosine",
                          "warmup": 0.05})
PREDICTOR_DEVICES = ("local", "emulated-a53", "emulated-a76")
OPTIMIZE_DEVICES = {"local": ORT_TARGET, "emulated-a76": ARM_TARGET}  # device → the target whose artifacts it prices
OPTIMIZE_TRIALS, OPTIMIZE_MAX_DROP, OPTIMIZE_REMEASURE_ROUNDS = 40, 0.01, 9
# A candidate's fine-tuning: the digits schedule of FINETUNE_DIGITS bounded by epochs, not seconds (a
# search must choose the same under any load); a candidate built so took 1–5 min on a loaded box (keras_cnn–mobilenetv2).
OPTIMIZE_FINETUNE = {"epochs": 20, "lr": 3e-3, "patience": 20, "schedule": "cosine", "warmup": 0.05}
SCALE_MODELS, SCALE_TRIALS, SCALE_BATCH, SCALE_DEVICE = ("mobilenetv2",), OPTIMIZE_TRIALS, 4, "emulated-a76"  # optimize's default trials


def _tflite(path: Path) -> LiteRTRunner:
    return LiteRTRunner(path, threads=1, xnnpack=True)


def _round_ratios(latency: dict, numerator: str, denominator: str) -> dict[str, float]:
    """Median, min and max over rounds of the ratio of two runners' medians in the same round."""
    ratios = np.array(latency[numerator]["round_medians_ms"]) / np.array(latency[denominator]["round_medians_ms"])
    return {"median": round(float(np.median(ratios)), 3), "min": round(float(ratios.min()), 3), "max": round(float(ratios.max()), 3)}


def _ratio(latency: dict, numerator: str, denominator: str) -> float:
    return round(latency[numerator]["best_median_ms"] / latency[denominator]["best_median_ms"], 3)


def _deflated(path: Path) -> int:
    return len(zlib.compress(path.read_bytes(), 9))


def _geomean(values: list[float]) -> float | None:
    return round(float(np.exp(np.mean(np.log(values)))), 3) if values else None


class Bench:
    """Builds into ``work`` (kept, so later sections reuse artifacts) and makes the rows."""

    def __init__(self, work: Path, runs: int):
        self.work = work
        self.runs = runs
        self.zoo = json.loads((REPO / "models" / "zoo.json").read_text())
        self.built: dict[tuple[str, str, str], tuple[BuildResult, float]] = {}
        self.peer: dict[str, tuple[dict[str, Path], str | None]] = {}  # onnx2tf's conversions by model

    def source(self, entry: dict) -> Path:
        return REPO / "models" / entry["file"]

    def build(self, entry: dict, target: str, variant: str = "fp32", **options) -> tuple[BuildResult, float]:
        """Build once per (model, target, variant); later sections reuse the artifact."""
        key = (entry["name"], target, variant)
        if key not in self.built:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. random calibration: recorded in the report
                result = build(self.source(entry), target, self.work / entry["name"] / f"{target}-{variant}",
                               BuildOptions(**{"max_samples": 8, **options}))
            self.built[key] = result, time.perf_counter() - start
        return self.built[key]

    def target_row(self, entry: dict, target: str) -> dict:
        try:
            result, seconds = self.build(entry, target)
        except EdgecError as exc:
            return {"model": entry["name"], "target": target, "converts": False, "error": str(exc)}
        artifact = open_runner(result.artifacts[0], threads=1, options=result.report["target"]["runtime"])
        source = OrtRunner(self.source(entry), threads=1, optimization="all")
        latency = compare_latency({"source_onnxruntime": source, "artifact": artifact}, self.runs)
        return {
            "model": entry["name"],
            "target": target,
            "converts": True,
            "build_seconds": round(seconds, 2),
            "artifacts": {p.name: p.stat().st_size for p in result.artifacts},
            "source_size_bytes": self.source(entry).stat().st_size,
            "max_relative_error": max(o.relative_error for o in result.verification.outputs),
            "latency_ms": latency,
            "speedup_vs_source": _ratio(latency, "source_onnxruntime", "artifact"),
        }

    def edgec_int8(self, entry: dict, target: str = TFLITE_TARGET, variant: str = "int8", **options) -> BuildResult:
        """int8 on the whole held-out split without the speed check, so the rows record
        cosine, accuracy and latency whatever they are. No pass/fail bar either (which also
        turns off ORT's precision search) unless ``min_cosine=None`` asks for the target's."""
        data = {"inputs": str(REPO / entry["eval_data"]), "calib": str(REPO / entry["calib_data"]),
                "images": ImagePreprocess(tuple(entry.get("input_range", (0.0, 1.0)))), "min_cosine": 0.0}
        return self.build(entry, target, variant, precision="int8", max_samples=None, speed_check=False,
                          **{**data, **options})[0]

    def int8_row(self, entry: dict) -> dict:
        row = self._int8_comparison(entry, TFLITE_TARGET, _tflite)
        lowering = self.edgec_int8(entry).report["lowering"]
        return {**row, "float_ops": lowering["float_ops"], "kept_float_for_xnnpack": lowering["kept_float_for_xnnpack"],
                "placement": lowering["placement"]}

    def ort_int8_row(self, entry: dict) -> dict:
        """With the target's accuracy criterion, so the precision search keeps float what it needs."""
        try:
            row = self._int8_comparison(entry, ORT_TARGET, lambda path: OrtRunner(path, threads=1), min_cosine=None)
        except EdgecError as exc:
            return {"model": entry["name"], "error": str(exc)}
        quantization = self.edgec_int8(entry, ORT_TARGET, min_cosine=None).report["lowering"]["quantization"]
        return {**row, "kept_float": len(quantization["kept_float"]), "quantized_ops": quantization["quantized_ops"]}

    def _int8_comparison(self, entry: dict, target: str, runner, **options) -> dict:
        fp32, int8 = self.build(entry, target)[0], self.edgec_int8(entry, target, **options)
        latency = compare_latency({"fp32": runner(fp32.artifacts[0]), "int8": runner(int8.artifacts[0])}, self.runs)
        output = int8.verification.outputs[0]
        return {
            "model": entry["name"],
            "size_bytes": {"fp32": fp32.artifacts[0].stat().st_size, "int8": int8.artifacts[0].stat().st_size},
            "latency_ms": latency,
            "int8_speedup": _ratio(latency, "fp32", "int8"),
            "slower_int8_kernels": int8_losses(compare_kernels(fp32.artifacts[0], int8.artifacts[0], 1)),
            "min_cosine": min(o.cosine for o in int8.verification.outputs),
            "accuracy": {"fp32_source": output.accuracy_source, "int8": output.accuracy_artifact},
        }

    def pruning_row(self, entry: dict) -> dict:
        """Each of PRUNING_VARIANTS on the held-out split, timed against the unpruned artifact."""
        data = {"inputs": str(REPO / entry["eval_data"]), "calib": str(REPO / entry["calib_data"]), "max_samples": None}
        unpruned = self.build(entry, ORT_TARGET)[0].artifacts[0]
        row: dict = {"model": entry["name"], "unpruned": {"size_bytes": unpruned.stat().st_size, "deflated_bytes": _deflated(unpruned)}}
        runners = {"unpruned": OrtRunner(unpruned, threads=1)}
        for variant, recipe in PRUNING_VARIANTS.items():
            result = self.build(entry, ORT_TARGET, variant, recipe=recipe, **data)[0]
            compression, artifact = result.report["compression"], result.artifacts[0]
            logits = compression["vs_source"]["outputs"][0]
            row["top1_source"] = logits["accuracy_source"]
            row[variant] = {"top1": logits["accuracy_artifact"], "mac_reduction": compression["mac_reduction"],
                            "size_bytes": artifact.stat().st_size, "deflated_bytes": _deflated(artifact)}
            runners[variant] = OrtRunner(artifact, threads=1)
        row["latency_ms"] = compare_latency(runners, self.runs)
        row["speedup_vs_unpruned"] = {v: _ratio(row["latency_ms"], "unpruned", v) for v in PRUNING_VARIANTS}
        return row

    def recovery_row(self, entry: dict, target: str) -> dict:
        """int8 error with each accuracy-recovery pass on or off (same calibration)."""
        variants = {}
        for name, options in RECOVERY_VARIANTS.items():
            output = self.edgec_int8(entry, target, f"int8-{name}", **options).verification.outputs[0]
            variants[name] = {"cosine": round(output.cosine, 6), "mean_abs_error": round(output.mean_abs_error, 5),
                              "top1": output.accuracy_artifact, "top1_agreement": output.top1_agreement}
        return {"model": entry["name"], "target": target, "variants": variants}

    def int8_quality_row(self, entry: dict, target: str) -> dict:
        """Post-training int8 quality per calibration choice (see the module docstring)."""
        row: dict = {"model": entry["name"], "target": target}
        for variant, options in INT8_QUALITY_VARIANTS.items():
            start = time.perf_counter()
            try:
                result = self.edgec_int8(entry, target, f"quality-{variant}", min_cosine=None, **options)
            except EdgecError as exc:
                row[variant] = {"error": str(exc)}
                continue
            outputs = result.verification.outputs
            drop = [o.accuracy_source - o.accuracy_artifact for o in outputs if o.accuracy_source is not None]
            row[variant] = {"int8_macs_fraction": result.report["int8"]["int8_macs_fraction"],
                            "min_cosine": round(min(o.cosine for o in outputs), 6),
                            "top1_drop": round(max(drop), 4) if drop else None,
                            "build_seconds": round(time.perf_counter() - start, 1)}
        return row

    def arm_cost_row(self, entry: dict) -> dict:
        """Instructions per inference on each emulated ARM core of edgec's fp32 and int8 .tflite
        (tflite-arm; int8 as a default build makes it: the target's criterion, precision
        search on) and of onnx2tf's int8 file of the same model, when onnx2tf is installed."""
        int8 = self.edgec_int8(entry, ARM_TARGET, min_cosine=None)
        artifacts = {"fp32": self.build(entry, ARM_TARGET)[0].artifacts[0], "int8": int8.artifacts[0]}
        peer = self._onnx2tf(entry).get("int8")
        if peer is not None:
            artifacts["onnx2tf_int8"] = peer
        settings = ProfileSettings(warmup=1, runs=3, ops=False)
        devices = {}
        for device in ARM_DEVICES:
            cost = {kind: profile(path, device, settings)["cost"] for kind, path in artifacts.items()}
            devices[device] = {
                **{kind: {"instructions": c["instructions"], "vector_instructions": c["vector_instructions"]} for kind, c in cost.items()},
                "int8_vs_fp32_instructions": round(cost["int8"]["instructions"] / cost["fp32"]["instructions"], 3),
                "int8_vs_fp32_vector": round(cost["int8"]["vector_instructions"] / cost["fp32"]["vector_instructions"], 3),
            }
            if peer is not None:
                devices[device]["int8_vs_onnx2tf_int8_instructions"] = round(
                    cost["int8"]["instructions"] / cost["onnx2tf_int8"]["instructions"], 3)
        lowering = int8.report["lowering"]
        return {"model": entry["name"], "int8_macs_fraction": int8.report["int8"]["int8_macs_fraction"],
                "float_ops": lowering["float_ops"], "devices": devices}

    def factorization_row(self, entry: dict) -> dict:
        """Plain vs data-aware factorization on ORT x86: top-1 on the whole held-out split
        (the build measures the factorized model against the source) and latency."""
        data = {"inputs": str(REPO / entry["eval_data"]), "calib": str(REPO / entry["calib_data"]), "max_samples": None}
        variants = {}
        for name, aware in (("plain", False), ("data_aware", True)):
            step = Step("factorize", {**FACTORIZATION, "data_aware": aware})
            variants[name] = self.build(entry, ORT_TARGET, f"factorize-{name}", recipe=[step], **data)[0]
        runners = {"unfactorized": OrtRunner(self.build(entry, ORT_TARGET)[0].artifacts[0], threads=1)}
        runners.update({name: OrtRunner(result.artifacts[0], threads=1) for name, result in variants.items()})
        latency = compare_latency(runners, self.runs)
        outputs = {name: result.report["compression"]["vs_source"]["outputs"][0] for name, result in variants.items()}
        return {
            "model": entry["name"],
            "mac_reduction": {name: result.report["compression"]["mac_reduction"] for name, result in variants.items()},
            "top1": {"source": outputs["plain"]["accuracy_source"], **{n: o["accuracy_artifact"] for n, o in outputs.items()}},
            "latency_ms": latency,
            "speedup": {name: _ratio(latency, "unfactorized", name) for name in variants},
        }

    def build_time_row(self, entry: dict, target: str, precision: str) -> dict:
        """The build a user runs, timed stage by stage in a fresh process."""
        timing = timed_build(self.source(entry), target, self.work / entry["name"] / f"{target}-{precision}-timed",
                             REPO / entry["eval_data"], precision, REPO / entry["calib_data"] if precision == "int8" else None,
                             tuple(entry.get("input_range", (0.0, 1.0))))
        return {"model": entry["name"], "macs": entry["macs"], "target": target, "precision": precision, **timing}

    def round_trip_row(self, entry: dict) -> dict:
        original = REPO / "models" / entry["original_tflite"]
        artifacts = {"edgec": self.build(entry, TFLITE_TARGET)[0].artifacts[0]}
        row: dict = {"model": entry["name"]}
        plain = self.plain_round_trip(entry, original)
        if isinstance(plain, Path):
            artifacts["plain_tf2onnx"] = plain
        else:
            row["plain_tf2onnx_error"] = plain
        factories = {name: functools.partial(_tflite, path) for name, path in {"original": original, **artifacts}.items()}
        latency = compare_latency(factories, self.runs, ROUND_TRIP_ROUNDS)
        ratios = {name: _round_ratios(latency, name, "original") for name in artifacts}
        return {
            **row,
            "latency_ms": latency,
            **{f"{name}_vs_original": r["median"] for name, r in ratios.items()},
            "spread_vs_original": {name: [r["min"], r["max"]] for name, r in ratios.items()},
            "size_bytes": {"original": original.stat().st_size, **{name: p.stat().st_size for name, p in artifacts.items()}},
        }

    def predictor_row(self, name: str, entries: list[dict]) -> dict:
        """Predicted against measured cost of every zoo model in fp32 and int8 on device ``name``
        and of the pretrained originals, each predicted by a fit that did not see its model."""
        device = get_device(name)
        target = TFLITE_TARGETS[device.arch]
        store = PredictorStore(cache_dir(), name)
        try:
            predictor = store.load()
        except PredictorMissing as exc:
            return {"device": name, "skipped": exc.message}
        artifacts = self.predictor_artifacts(entries, target)
        costs = measure_batch(device, [a.path.read_bytes() for a in artifacts], predictor.threads)
        measured = [dataclasses.replace(a, cost=c) for a, c in zip(artifacts, costs) if c is not None]
        samples = [r for r in store.samples() if r["threads"] == predictor.threads]
        rows = cross_validate(samples, measured, device, predictor.threads, target)
        return {"device": name, "metric": predictor.metric, "threads": predictor.threads, "samples": len(samples),
                "kernels": predictor.summary()["kernels"], **accuracy(rows),
                **{precision: accuracy([r for r in rows if r["precision"] == precision]) for precision in ("fp32", "int8")},
                "models": rows}

    def predictor_artifacts(self, entries: list[dict], target: str) -> list[Measured]:
        """The zoo's fp32 and int8 builds for ``target`` and the pretrained originals (cost unset)."""
        artifacts = []
        for entry in entries:
            for precision in ("fp32", "int8"):
                try:
                    built = self.build(entry, target)[0] if precision == "fp32" else self.edgec_int8(entry, target)
                except EdgecError:
                    continue
                artifacts.append(Measured(entry["name"], precision, built.artifacts[0], 0.0))
            if entry.get("original_tflite"):
                artifacts.append(Measured(entry["name"], "fp32", REPO / "models" / entry["original_tflite"], 0.0, pretrained=True))
        return artifacts

    def plain_round_trip(self, entry: dict, original: Path) -> Path | str:
        """The original through a plain tf2onnx run (none of the zoo's fixes, as a user would
        convert it) and edgec: the artifact, or why there is none."""
        try:
            import tf2onnx
        except ImportError:
            return "tf2onnx is not installed (pip install -e '.[zoo]')"
        folder = self.work / entry["name"] / "plain-tf2onnx"
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / f"{entry['name']}.onnx"
        tf2onnx.convert.from_tflite(str(original), opset=17, output_path=str(source))
        try:
            return build(source, TFLITE_TARGET, folder / "out", BuildOptions(max_samples=8)).artifacts[0]
        except EdgecError as exc:
            return str(exc)

    def _onnx2tf(self, entry: dict) -> dict[str, Path]:
        """onnx2tf's files of ``entry`` (see ``onnx2tf.convert``), converted once per bench."""
        if entry["name"] not in self.peer:
            self.peer[entry["name"]] = onnx2tf.convert(self.source(entry), self.work / entry["name"] / "onnx2tf", self._nhwc_calib(entry)) \
                if onnx2tf.available() else ({}, "onnx2tf is not installed")
        return self.peer[entry["name"]][0]

    def onnx2tf_row(self, entry: dict) -> dict:
        self._onnx2tf(entry)
        produced, error = self.peer[entry["name"]]
        row: dict = {"model": entry["name"], "converts": "fp32" in produced, "error": error}
        if "fp32" in produced:
            edgec = self.build(entry, TFLITE_TARGET)[0].artifacts[0]
            latency = compare_latency({"edgec": _tflite(edgec), "onnx2tf": _tflite(produced["fp32"])}, self.runs)
            row["fp32"] = {"latency_ms": latency, "edgec_vs_onnx2tf": _ratio(latency, "edgec", "onnx2tf")}
        if "int8" in produced:
            edgec = self.edgec_int8(entry).artifacts[0]
            latency = compare_latency({"edgec": _tflite(edgec), "onnx2tf": _tflite(produced["int8"])}, self.runs)
            row["int8"] = {"latency_ms": latency, "edgec_vs_onnx2tf": _ratio(latency, "edgec", "onnx2tf")}
        return row

    def optimize_row(self, entry: dict, device: str) -> dict:
        """One digits classifier on one device, for each budget (see the module docstring)."""
        target = OPTIMIZE_DEVICES[device]
        reference = self.build(entry, target)[0].artifacts[0]  # the bench's own fp32 build: apart from the search's
        budgets = {"speedup_2": Budgets(speedup=2.0), "speedup_3": Budgets(speedup=3.0),
                   "size_third": Budgets(size_kb=reference.stat().st_size / 3 / 1024)}
        return {"model": entry["name"], "device": device, "target": target,
                **{name: self._optimized(entry, device, target, name, budget, reference) for name, budget in budgets.items()}}

    def _optimized(self, entry: dict, device: str, target: str, name: str, budget: Budgets, reference: Path) -> dict:
        out = self.work / entry["name"] / f"optimize-{device}-{name}"
        options = OptimizeOptions(eval=str(REPO / entry["eval_data"]), calib=str(REPO / entry["calib_data"]), budgets=budget,
                                  device=device, max_drop=OPTIMIZE_MAX_DROP, trials=OPTIMIZE_TRIALS,
                                  finetune={"data": _digits_train(self.work, entry), **OPTIMIZE_FINETUNE})
        start = time.perf_counter()
        search = self._search(entry, target, out, options)
        seconds = time.perf_counter() - start
        met = search["chosen"] is not None
        chosen = search["candidates"][search["chosen"] if met else search["closest"]]
        artifact = (out if met else out / "closest") / chosen["artifact"]
        again = self._remeasured(artifact, reference, device, target)
        baselines = {k: {m: b[m] for m in ("relative_cost", "accuracy", "loss", "size_bytes", "macs")} if b and "error" not in b else b
                     for k, b in search["baselines"].items()}
        return {"met": met, "choice": chosen["settings"], "relative_cost": chosen["relative_cost"], "remeasured_relative_cost": again,
                "meets_when_remeasured": (again <= 1 / budget.speedup if budget.speedup else artifact.stat().st_size <= budget.size_kb * 1024),
                "top1": chosen["accuracy"], "top1_drop": chosen["loss"], "size_bytes": chosen["size_bytes"], "macs": chosen["macs"],
                "baselines": baselines, "trials": search["trials"], "seconds": round(seconds, 1)}

    def _remeasured(self, artifact: Path, reference: Path, device: str, target: str) -> float:
        """The artifact's cost relative to ``reference``, measured anew: instructions on an
        emulated core, else here as the search measures (the target's threads, new sessions
        each round), in more rounds and with none of the search's cached numbers."""
        if device != "local":
            settings = ProfileSettings(warmup=0, runs=1, ops=False)
            counts = [profile(path, device, settings)["cost"]["instructions"] for path in (artifact, reference)]
            return round(counts[0] / counts[1], 4)
        spec = load_target(target)
        return round(local_latency(artifact, reference, spec.runtime, spec.threads, OPTIMIZE_REMEASURE_ROUNDS)["relative"], 3)

    def optimize_time_row(self, entry: dict) -> dict:
        """Wall time of 40 NSGA-II trials on local (cost measured in alternating rounds here)."""
        options = OptimizeOptions(eval=str(REPO / entry["eval_data"]), calib=str(REPO / entry["calib_data"]),
                                  budgets=Budgets(speedup=3.0), max_drop=OPTIMIZE_MAX_DROP, strategy="evolutionary", trials=OPTIMIZE_TRIALS)
        start = time.perf_counter()
        search = self._search(entry, ORT_TARGET, self.work / entry["name"] / "optimize-time", options)
        built = [c for c in search["candidates"] if "error" not in c]
        return {"model": entry["name"], "trials": search["trials"], "seconds": round(time.perf_counter() - start, 1),
                "build_and_measure_seconds_median": float(np.median([c["seconds"] for c in built])), "failed": len(search["candidates"]) - len(built)}

    def node_tests_row(self, target: str, precision: str) -> dict:
        """ONNX's node tests built for ``target`` at ``precision`` (see ``edgec.bench.node_tests``)."""
        from edgec.bench import node_tests  # here: ``python -m edgec.bench.node_tests`` must find it unimported

        start = time.perf_counter()
        rows = node_tests.sweep(target, node_tests.node_test_dirs(), self.work / "node_tests" / f"{target}-{precision}", precision=precision)
        return {"target": target, "precision": precision, **node_tests.summary(rows), "seconds": round(time.perf_counter() - start, 1)}

    def scale_row(self, entry: dict) -> dict:
        """One search on each executor: wall time and the choice (see the module docstring)."""
        runs = {}
        for executor in ("local", "ray"):
            out = self.work / entry["name"] / f"scale-{executor}"
            shutil.rmtree(out, ignore_errors=True)  # nothing reused from an earlier run
            options = OptimizeOptions(eval=str(REPO / entry["eval_data"]), calib=str(REPO / entry["calib_data"]),
                                      budgets=Budgets(macs=int(self.build(entry, ARM_TARGET)[0].report["model"]["macs"] * 0.6)),
                                      device=SCALE_DEVICE, max_drop=OPTIMIZE_MAX_DROP, strategy="evolutionary", trials=SCALE_TRIALS,
                                      batch=SCALE_BATCH, executor=executor)
            start = time.perf_counter()
            runs[executor] = (self._search(entry, ARM_TARGET, out, options), round(time.perf_counter() - start, 1))
        (local, local_s), (ray, ray_s) = runs["local"], runs["ray"]
        return {"model": entry["name"], "trials": SCALE_TRIALS, "local_seconds": local_s, "ray_seconds": ray_s,
                "ray_workers": os.cpu_count(), "speedup": round(local_s / ray_s, 3),
                "same_choice": _chosen_settings(local) == _chosen_settings(ray),
                "same_candidates": [c["settings"] for c in local["candidates"]] == [c["settings"] for c in ray["candidates"]]}

    def _search(self, entry: dict, target: str, out: Path, options: OptimizeOptions) -> dict:
        """search.json of ``optimize`` (of the closest point when no candidate met the budget)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return optimize(self.source(entry), target, out, options).search
            except BudgetError:
                return json.loads((out / "search.json").read_text())

    def finetune_row(self, entry: dict) -> dict:
        """One-shot pruning against pruning + fine-tuning: int8 TFLite top-1 on the held-out
        digits (labeled training split), or fp32 output cosines on held-out photos (no labels)."""
        labeled = entry["task"] == "classification"
        rate, options = FINETUNE_DIGITS if labeled else FINETUNE_PHOTOS
        data = _digits_train(self.work, entry) if labeled else str(REPO / entry["calib_data"])
        prune, finetune = Step("prune", {"mac_reduction": rate}), Step("finetune", {"data": data, **options})
        gated = Step("prune", {"mac_reduction": rate, "importance": "gates"})
        recipes = {f"pruned-{rate}": [prune], f"pruned-{rate}-finetuned": [prune, finetune],
                   f"pruned-{rate}-gates-finetuned": [gated, finetune]}
        if not labeled:  # factorization keeps a detector's residual stream whole (blazeface: one channel group)
            factorize = Step("factorize", {"mac_reduction": rate})
            recipes |= {f"factorized-{rate}": [factorize], f"factorized-{rate}-finetuned": [factorize, finetune]}
        results, seconds = {}, {}
        for variant, recipe in recipes.items():
            start = time.perf_counter()
            try:
                results[variant] = self._finetune_build(entry, variant, recipe, labeled)
            except EdgecError as exc:  # e.g. a model whose frozen channels leave less than the rate to remove
                return {"model": entry["name"], "error": str(exc)}
            seconds[variant] = round(time.perf_counter() - start, 1)
        one_shot, tuned, gates = (results[f"pruned-{rate}{suffix}"] for suffix in ("", "-finetuned", "-gates-finetuned"))
        row = {"model": entry["name"], "mac_reduction": tuned.report["compression"]["mac_reduction"], "options": options,
               "build_seconds": seconds[f"pruned-{rate}-finetuned"], "finetune": {k: tuned.report["finetune"][k] for k in FINETUNE_KEYS},
               "gates": {"mac_reduction": gates.report["compression"]["mac_reduction"], "build_seconds": seconds[f"pruned-{rate}-gates-finetuned"]}}
        if labeled:
            return row | {"top1_source": one_shot.report["compression"]["vs_source"]["outputs"][0]["accuracy_source"],
                          "top1_one_shot_int8": one_shot.verification.outputs[0].accuracy_artifact,
                          "top1_finetuned_int8": tuned.verification.outputs[0].accuracy_artifact,
                          "top1_gates_finetuned_int8": gates.verification.outputs[0].accuracy_artifact,
                          "gradual_pruning": self._weights_row(entry, data, FINETUNE_SPARSE, "int8"),
                          "clustering": self._weights_row(entry, data, FINETUNE_CLUSTERS, "fp32"),
                          "qat": {target: self._qat_row(entry, data, target) for target in (TFLITE_TARGET, ORT_TARGET)}}
        return row | {"cosine_one_shot": _source_cosines(one_shot), "cosine_finetuned": _source_cosines(tuned),
                      "cosine_gates_finetuned": _source_cosines(gates),
                      "factorized": {"mac_reduction": results[f"factorized-{rate}"].report["compression"]["mac_reduction"],
                                     "cosine_one_shot": _source_cosines(results[f"factorized-{rate}"]),
                                     "cosine_finetuned": _source_cosines(results[f"factorized-{rate}-finetuned"]),
                                     "build_seconds": seconds[f"factorized-{rate}-finetuned"]}}

    def _weights_row(self, entry: dict, data: str, options: dict, precision: str) -> dict:
        """Fine-tuning that only constrains weights (sparsity or clusters): held-out top-1 and the
        deflated .tflite against the unconstrained artifact of the same precision."""
        eval_data = {"inputs": str(REPO / entry["eval_data"]), "calib": str(REPO / entry["calib_data"]), "max_samples": None,
                     "min_cosine": 0.0, "speed_check": False}
        variant = "-".join(f"{k}{v}" for k, v in options.items() if k in ("sparsity", "clusters"))
        start = time.perf_counter()
        built = {name: self.build(entry, TFLITE_TARGET, f"{precision}-{name}", precision=precision, **eval_data,
                                  recipe=[Step("finetune", {"data": data, **options})] if name == variant else ())[0]
                 for name in ("dense", variant)}
        dense, tuned = built["dense"], built[variant]
        return {"options": options, "precision": precision, "build_seconds": round(time.perf_counter() - start, 1),
                "top1_dense": dense.verification.outputs[0].accuracy_artifact, "top1": tuned.verification.outputs[0].accuracy_artifact,
                "deflated_bytes": {"dense": _deflated(dense.artifacts[0]), variant: _deflated(tuned.artifacts[0])},
                "deflated_ratio": round(_deflated(dense.artifacts[0]) / _deflated(tuned.artifacts[0]), 2),
                "finetune": {k: tuned.report["finetune"].get(k) for k in (*FINETUNE_KEYS, "sparsity")}}

    def _qat_row(self, entry: dict, data: str, target: str) -> dict:
        """Quantization-aware training of the unpruned model against post-training int8 (all-int8,
        held-out top-1): does QAT hold int8 within 0.3 pt of the fp32 source?"""
        start = time.perf_counter()
        tuned = self.edgec_int8(entry, target, "int8-qat", recipe=[Step("finetune", {"data": data, **FINETUNE_QAT})])
        plain = self.edgec_int8(entry, target).verification.outputs[0]
        qat = tuned.report["finetune"]["qat"]
        return {"options": FINETUNE_QAT, "build_seconds": round(time.perf_counter() - start, 1), "top1_source": plain.accuracy_source,
                "top1_int8": plain.accuracy_artifact, "top1_qat_int8": tuned.verification.outputs[0].accuracy_artifact,
                "activations": qat["activations"]["tensors"], "finetune": {k: tuned.report["finetune"][k] for k in FINETUNE_KEYS}}

    def _finetune_build(self, entry: dict, variant: str, recipe: list[Step], labeled: bool) -> BuildResult:
        """Digits: int8 TFLite on the held-out split; photos: ORT fp32 (the cosines compare ONNX models)."""
        if labeled:
            return self.edgec_int8(entry, TFLITE_TARGET, variant, recipe=recipe)
        data = {"inputs": str(REPO / entry["eval_data"]), "calib": str(REPO / entry["calib_data"]), "max_samples": None,
                "images": ImagePreprocess(tuple(entry.get("input_range", (0.0, 1.0))))}
        return self.build(entry, ORT_TARGET, variant, recipe=recipe, **data)[0]

    def _nhwc_calib(self, entry: dict) -> dict[str, Path] | None:
        """The zoo's calibration split as onnx2tf wants it: one .npy per input (image folders
        read with the model's input range, as edgec reads them). onnx2tf takes every 4-D ONNX
        input for NCHW and its calibration in the transposed order, so a 4-D input's array is
        transposed (0, 2, 3, 1) whatever its layout (an NHWC one given as it is failed)."""
        if not entry.get("calib_data"):
            return None
        folder = self.work / entry["name"] / "onnx2tf-calib"
        folder.mkdir(parents=True, exist_ok=True)
        specs = input_specs(load(self.source(entry)))
        samples = load_calibration(str(REPO / entry["calib_data"]), specs,
                                   images=ImagePreprocess(tuple(entry.get("input_range", (0.0, 1.0)))))
        files = {}
        for spec in entry["inputs"]:
            array = np.concatenate([batch[spec["name"]] for batch in samples.batches])
            if array.ndim == 4:
                array = array.transpose(0, 2, 3, 1)
            files[spec["name"]] = folder / f"{spec['name']}.npy"
            np.save(files[spec["name"]], np.ascontiguousarray(array))
        return files


FINETUNE_KEYS = ("samples", "epochs", "best_epoch", "stopped", "before", "after", "metric")


def _digits_train(work: Path, entry: dict) -> str:
    """The zoo's digits training split in the layout of ``entry``'s data, as an .npz."""
    import sys

    sys.path.insert(0, str(REPO / "models"))
    import digits

    layout = Path(entry["eval_data"]).stem.rsplit("_", 1)[1]
    make, key = digits.LAYOUTS[layout]
    path = work / "finetune_data" / f"digits_train_{layout}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        split = digits.load().train
        digits.save_npz(path, {key: make(split), "label": split.labels})
    return str(path)


def _chosen_settings(search: dict) -> dict:
    index = search["chosen"] if search["chosen"] is not None else search["closest"]
    return search["candidates"][index]["settings"]


def _source_cosines(result: BuildResult) -> dict[str, float]:
    return {o["name"]: round(o["cosine"], 5) for o in result.report["compression"]["vs_source"]["outputs"]}


def _sklearn_ready() -> bool:
    import importlib.util

    return importlib.util.find_spec("sklearn") is not None


def _summary(report: dict) -> dict:
    rows = {section: report[section] or [] for section in ("round_trip", "tflite_int8", "ort_int8", "results", "pruning")}
    trips = [r["edgec_vs_original"] for r in rows["round_trip"]]
    plain_trips = [r["plain_tf2onnx_vs_original"] for r in rows["round_trip"] if "plain_tf2onnx_vs_original" in r]
    summary = {
        "round_trip_edgec_vs_original_geomean": _geomean(trips),
        "round_trip_worst": max(trips) if trips else None,
        "round_trip_plain_tf2onnx_geomean": _geomean(plain_trips),
        "round_trip_plain_tf2onnx_worst": max(plain_trips) if plain_trips else None,
        "int8_speedup_geomean": _geomean([r["int8_speedup"] for r in rows["tflite_int8"]]),
        "ort_int8_speedup_geomean": _geomean([r["int8_speedup"] for r in rows["ort_int8"] if "int8_speedup" in r]),
        "edgec_converts": _converted(rows["results"]),
        "pruned_speedup_geomean": _geomean([r["speedup_vs_unpruned"]["pruned"] for r in rows["pruning"]]),
        "pruned_worst_top1_loss": max((round(r["top1_source"] - r["pruned"]["top1"], 4) for r in rows["pruning"]), default=None),
    }
    for row in report["build_time"] or ():
        summary[f"build_seconds_{row['model']}_{row['target']}_{row['precision']}"] = row["wall_seconds"]
    for device in ARM_DEVICES if report["arm_int8_cost"] else ():
        ratios = [r["devices"][device]["int8_vs_fp32_instructions"] for r in report["arm_int8_cost"]]
        summary[f"{device}_int8_vs_fp32_instructions_geomean"] = _geomean(ratios)
        summary[f"{device}_int8_vs_fp32_instructions_worst"] = max(ratios)
        peers = [r["devices"][device]["int8_vs_onnx2tf_int8_instructions"] for r in report["arm_int8_cost"]
                 if "int8_vs_onnx2tf_int8_instructions" in r["devices"][device]]
        summary[f"{device}_int8_vs_onnx2tf_int8_instructions_geomean"] = _geomean(peers)
        summary[f"{device}_int8_vs_onnx2tf_int8_instructions_worst"] = max(peers, default=None)
    for variant in INT8_QUALITY_VARIANTS if report["int8_quality"] else ():
        rows = [r[variant] for r in report["int8_quality"]]
        summary[f"int8_quality_{variant}_at_least_90pct_int8"] = f"{sum((r.get('int8_macs_fraction') or 0) >= 0.9 for r in rows)}/{len(rows)}"
    for row in report["predictor"] or ():
        if "rmspe" in row:
            summary[f"predictor_{row['device']}_rmspe"] = row["rmspe"]
            summary[f"predictor_{row['device']}_within_10pct"] = row["within_10pct"]
    for variant in ("plain", "data_aware") if report["factorization"] else ():
        factorized = report["factorization"]
        summary[f"factorization_{variant}_speedup_geomean"] = _geomean([r["speedup"][variant] for r in factorized])
        summary[f"factorization_{variant}_top1_drop_worst"] = round(max(r["top1"]["source"] - r["top1"][variant] for r in factorized), 4)
    optimized = [row[b] for row in report.get("optimize") or () for b in ("speedup_2", "speedup_3", "size_third")]
    if optimized:
        summary["optimize_met"] = f"{sum(r['met'] for r in optimized)}/{len(optimized)}"
        summary["optimize_met_when_remeasured"] = f"{sum(r['met'] and r['meets_when_remeasured'] for r in optimized)}/{len(optimized)}"
        uniform = [r for r in optimized if r["met"] and isinstance(r["baselines"].get("uniform"), dict) and "loss" in r["baselines"]["uniform"]]
        summary["optimize_as_accurate_as_uniform"] = f"{sum(r['top1_drop'] <= r['baselines']['uniform']['loss'] for r in uniform)}/{len(uniform)}"
    for row in report.get("node_tests") or ():
        key = f"node_tests_{row['target']}_{row['precision']}"
        summary[f"{key}_matching_expected"] = f"{row['outcomes'].get('matches', 0)}/{row['tests']}"
        summary[f"{key}_internal_died_or_timed_out"] = sum(len(row.get(o, [])) for o in ("internal", "died", "timeout"))
    if report["onnx2tf"] is not None:
        rows = report["onnx2tf"]
        summary["onnx2tf_converts"] = _converted(rows)
        for precision in ("fp32", "int8"):
            ratios = [r[precision]["edgec_vs_onnx2tf"] for r in rows if precision in r]
            summary[f"{precision}_edgec_vs_onnx2tf_geomean"] = _geomean(ratios)
            summary[f"{precision}_edgec_vs_onnx2tf_worst"] = max(ratios) if ratios else None
    return summary


def _converted(rows: list[dict]) -> str:
    """'converted/total' over models; a model counts if it converted in every row it has."""
    verdicts: dict[str, bool] = {}
    for row in rows:
        verdicts[row["model"]] = verdicts.get(row["model"], True) and row["converts"]
    return f"{sum(verdicts.values())}/{len(verdicts)}"


def _print_row(section: str, row: dict) -> None:
    brief = {k: v.get("edgec_vs_onnx2tf", v) if isinstance(v, dict) else v for k, v in row.items()
             if k not in ("latency_ms", "artifacts", "size_bytes", "float_ops", "placement", "stages")}
    print(f"[{section}] {json.dumps(brief, default=str)[:200]}", flush=True)


SKIPPED_BECAUSE = {"onnx2tf": "not installed (pip install -e '.[compare]')",
                   "arm_int8_cost": "no emulated ARM devices (make arm-emulator)",
                   "scale": "no emulated ARM devices (make arm-emulator)",
                   "finetune": "scikit-learn, which makes the digits training split, is not installed (pip install -e '.[zoo]')"}


def _emulator_ready() -> bool:
    return all(setup_problem(get_device(name).emulation) is None for name in ARM_DEVICES)


def run(bench: Bench, models: list[str] | None, targets: list[str], only: list[str] | None = None) -> dict:
    # Large models only where asked for by name, and in build_time.
    chosen = [e for e in bench.zoo if e["name"] in models] if models else [e for e in bench.zoo if not e.get("large")]
    timed = [e for e in bench.zoo if e["name"] in (models or BUILD_TIME_MODELS)]
    digits = [e for e in chosen if e.get("calib_data") and e["task"] == "classification"]
    report: dict = {"measured_on": platform.machine(), "threads": 1, "targets": targets, "versions": versions()}
    sections = {
        "results": [(e, t) for e in chosen for t in targets],
        "tflite_int8": [(e,) for e in chosen if e.get("calib_data")],
        "ort_int8": [(e,) for e in chosen if e.get("calib_data")],
        "int8_recovery": [(e, t) for e in chosen if e["name"] == "mobilenetv2" for t in (ORT_TARGET, TFLITE_TARGET)],
        "pruning": [(e,) for e in chosen if e.get("calib_data") and e["task"] == "classification"],
        "arm_int8_cost": [(e,) for e in chosen if e.get("calib_data")] if _emulator_ready() else None,
        "factorization": [(e,) for e in chosen if e.get("calib_data") and e["task"] == "classification"],
        "round_trip": [(e,) for e in chosen if e.get("original_tflite")],
        "onnx2tf": [(e,) for e in chosen] if onnx2tf.available() else None,
        "int8_quality": [(e, t) for e in chosen if e.get("calib_data") for t in (TFLITE_TARGET, ORT_TARGET)],
        "build_time": [(e, t, p) for e in timed for t in BUILD_TIME_TARGETS for p in ("fp32", "int8")],
        "finetune": ([(e,) for e in chosen if e.get("calib_data") and (e["task"] == "classification" or "photos" in e["calib_data"])]
                     if _sklearn_ready() else None),
        "predictor": [(d, chosen) for d in PREDICTOR_DEVICES],
        "optimize": [(e, d) for e in digits for d in OPTIMIZE_DEVICES if d == "local" or _emulator_ready()],
        "optimize_time": [(e,) for e in digits],
        "scale": [(e,) for e in digits if e["name"] in SCALE_MODELS] if _emulator_ready() else None,
        "node_tests": [(t, p) for t in (TFLITE_TARGET, ORT_TARGET) for p in ("fp32", "int8")],
    }
    makers = {"results": bench.target_row, "tflite_int8": bench.int8_row, "ort_int8": bench.ort_int8_row,
              "int8_recovery": bench.recovery_row, "pruning": bench.pruning_row, "arm_int8_cost": bench.arm_cost_row,
              "factorization": bench.factorization_row, "int8_quality": bench.int8_quality_row,
              "round_trip": bench.round_trip_row, "onnx2tf": bench.onnx2tf_row, "build_time": bench.build_time_row,
              "finetune": bench.finetune_row, "predictor": bench.predictor_row, "optimize": bench.optimize_row,
              "optimize_time": bench.optimize_time_row, "scale": bench.scale_row, "node_tests": bench.node_tests_row}
    for section, jobs in sections.items():
        if only and section not in only:
            report[section] = None
            continue
        if jobs is None:
            print(f"[{section}] skipped: {SKIPPED_BECAUSE[section]}", flush=True)
            report[section] = None
            continue
        report[section] = []
        for job in jobs:
            report[section].append(makers[section](*job))
            _print_row(section, report[section][-1])
    report["summary"] = _summary(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the zoo, time the artifacts, write JSON.")
    parser.add_argument("-o", "--output", default="build/bench.json")
    parser.add_argument("--work", default="build/bench", help="where artifacts are built (kept)")
    parser.add_argument("--models", nargs="*", help="zoo model names (default: all)")
    parser.add_argument("--targets", nargs="*", default=known_targets())
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--sections", nargs="*", help="only these sections (default: all)")
    args = parser.parse_args(argv)
    report = run(Bench(Path(args.work), args.runs), args.models, args.targets, args.sections)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.output}")
    return 0
