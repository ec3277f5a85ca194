"""One candidate, evaluated: settings → the real ``edgec build`` → cost on the device and
accuracy on ``--eval`` → a result dict.

:func:`evaluate` is a pure top-level function of plain, picklable values (a
:class:`Problem` and the settings), so an executor can run it as a task in another process
(issue #20) while the driver keeps Optuna's ask/tell in one. It builds with
:func:`edgec.build.build` itself, never a copy, so the chosen candidate's recipe rebuilds it
byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.build import BuildOptions, build, canonicalize, input_specs
from edgec.errors import EdgecError
from edgec.executors import Executor, Outcome, Pending, Task
from edgec.images import ImagePreprocess
from edgec.model import load, load_proto
from edgec.profile import get_device
from edgec.runtime import open_runner
from edgec.runtime.ort import OrtRunner
from edgec.search.cost import CostCache, measure, predicted
from edgec.search.space import recipe_steps
from edgec.targets import load_target
from edgec.verify import Criterion, InputSet, compare_outputs, load_inputs, run_all


@dataclasses.dataclass(frozen=True)
class Problem:
    """What every candidate of one search shares (paths as strings: it crosses processes)."""

    model: str
    target: str
    device: str
    eval: str
    work: str  # candidate builds go to work/candidates/<key>, measured costs to work/costs/
    devices: str | None = None
    calib: str | None = None
    seed: int = 0
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    images: ImagePreprocess = ImagePreprocess()
    max_drop: float | None = None  # also the int8 builds' precision search goal on labeled --calib
    finetune: tuple[tuple[str, Any], ...] = ()  # the finetune step's options (data, epochs...) when given
    reference: str | None = None  # the fp32 artifact costs are relative to; None while building it
    cost: str = "measured"  # or "predicted": by the device's latency predictor (edgec.predict)


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short, stable name for ``settings`` (candidate folders, memo of evaluated trials)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def build_settings(problem: Problem, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The build options a candidate fixes besides its steps (a recipe's ``[build]`` table).
    The speed check is off: the search itself measures cost, on the user's device."""
    chosen: dict[str, Any] = {"precision": settings["precision"], "seed": problem.seed}
    if problem.calib:
        chosen["calib"] = problem.calib
    if settings["precision"] == "int8":
        chosen["speed_check"] = False
        if settings["keep_float"]:
            chosen["keep_float"] = list(settings["keep_float"])
        if problem.max_drop is not None:
            chosen["max_drop"] = problem.max_drop
    return chosen


def build_options(problem: Problem, settings: Mapping[str, Any]) -> BuildOptions:
    """The BuildOptions of a candidate: its recipe and build settings (nothing else, so
    ``edgec build --recipe`` with the written recipe.toml is the same build)."""
    fixed = build_settings(problem, settings)
    return BuildOptions(input_shapes=dict(problem.input_shapes), images=problem.images,
                        recipe=recipe_steps(settings, dict(problem.finetune) or None),
                        **{k: tuple(v) if isinstance(v, list) else v for k, v in fixed.items()})


def evaluate(problem: Problem, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Build ``settings``, measure cost and accuracy: ``{"settings", "key", "cost",
    "relative_cost", "metric", "accuracy", "loss", "size_bytes", "macs", "seconds",
    "artifact", "sha256", "folder"}``, or ``{"settings", "key", "error", "seconds"}`` when the
    build refuses (an EdgecError, e.g. the artifact fails verification)."""
    built = build_candidate(problem, settings)
    return built if "error" in built else cost_of(problem, built)


def evaluate_all(executor: Executor, problem: Problem, settings: Sequence[Mapping[str, Any]],
                 built: Mapping[str, dict[str, Any]] | None = None, ahead: Sequence[Mapping[str, Any]] = ()
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``evaluate`` of every settings on ``executor``, and the builds of ``ahead`` (candidates
    evaluated later, whose builds need nothing from these) made in the same round of tasks.
    ``built`` holds such builds, by settings key. A cost counted or predicted in the task
    (emulated cores, predictors) goes with its build, one task per candidate, so no worker
    waits for the round's slowest build; a timed device's costs come after all the builds,
    one at a time on its board (measuring while builds run would time the builds too). A task
    that failed every retry is a failed candidate; the search goes on."""
    built, board = built or {}, _board(problem)
    first = build_candidate if board else evaluate  # a new candidate's task
    jobs = [(s, built.get(settings_key(s))) for s in settings]
    pending = lambda b: b is None or (board is None and "error" not in b)  # noqa: E731 - a task still to run for it
    tasks = [(s, Task(first, (problem, s)) if b is None else Task(cost_of, (problem, b))) for s, b in jobs if pending(b)]
    tasks += [(a, Task(build_candidate, (problem, a))) for a in ahead]
    done = iter(_results(executor.run([t for _, t in tasks]), [s for s, _ in tasks]))
    results = [next(done) if pending(b) else b for _, b in jobs]
    later = {settings_key(a): next(done) for a in ahead}
    if board is not None:
        costed = iter(evaluate_costs(executor, problem, [r for r in results if "error" not in r]))
        results = [r if "error" in r else next(costed) for r in results]
    return results, later


def counted_in_task(problem: Problem) -> bool:
    """Whether a candidate's cost is counted or predicted where it is built (an emulated core,
    a predictor), so a candidate needs nothing from any other: one task from settings to result."""
    return _board(problem) is None


def submit_evaluation(executor: Executor, problem: Problem, settings: Mapping[str, Any]) -> Pending:
    """``evaluate`` of ``settings`` as one task, its cost absolute (``relative_cost`` 1.0): the
    driver divides by the reference's cost, so the task need not wait for the reference.
    Only where :func:`counted_in_task`."""
    return executor.submit(Task(evaluate, (dataclasses.replace(problem, reference=None), dict(settings))))


def outcome_result(outcome: Outcome, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A task's result, or a failed candidate naming why the task failed after its retries."""
    return _results([outcome], [settings])[0]


def evaluate_costs(executor: Executor, problem: Problem, built: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``cost_of`` every built candidate on ``executor``: a timed device's one at a time on its board."""
    board = _board(problem)
    return _results(executor.run([Task(cost_of, (problem, b), board=board) for b in built]), [b["settings"] for b in built])


def _board(problem: Problem) -> str | None:
    """The physical device costs are timed on (one measurement at a time), or None when a
    cost is counted (emulated core) or predicted and can run anywhere, beside builds."""
    device = get_device(problem.device, problem.devices)
    return None if device.emulated or problem.cost == "predicted" else device.name


def _results(outcomes: Sequence[Outcome], settings: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [o.value if o.ok else {"settings": dict(s), "key": settings_key(s), "error": f"the task failed: {o.error}", "seconds": 0.0}
            for o, s in zip(outcomes, settings)]


def build_candidate(problem: Problem, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The build of ``settings`` and its accuracy on ``--eval`` (everything but the cost)."""
    start = time.perf_counter()
    key = settings_key(settings)
    folder = Path(problem.work) / "candidates" / key
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same notes for every candidate; the driver's checks said them once
            result = build(problem.model, problem.target, folder, build_options(problem, settings))
    except EdgecError as exc:
        return {"settings": dict(settings), "key": key, "error": str(exc), "seconds": round(time.perf_counter() - start, 3)}
    entry = result.report["artifacts"][0]
    return {"settings": dict(settings), "key": key, **accuracy(problem, folder / entry["file"]), "size_bytes": entry["size_bytes"],
            "macs": result.report["model"]["macs"], "seconds": round(time.perf_counter() - start, 3),
            "artifact": entry["file"], "sha256": entry["sha256"], "folder": str(folder)}


def cost_of(problem: Problem, built: Mapping[str, Any]) -> dict[str, Any]:
    """``built`` with its cost on the device, relative to the fp32 reference."""
    start = time.perf_counter()
    target, device = load_target(problem.target), get_device(problem.device, problem.devices)
    artifact, reference = Path(built["folder"]) / built["artifact"], Path(problem.reference) if problem.reference else None
    if problem.cost == "predicted":
        cost = predicted(artifact, reference, device)
    else:
        # "confirmed": measured anew, apart from (and not cached with) the search's own measurements
        folder = "costs-confirmed" if problem.cost == "confirmed" else "costs"
        cost = measure(artifact, reference, device, target.runtime, target.threads, CostCache(Path(problem.work) / folder))
    return {**built, "cost": cost["value"], "relative_cost": cost["relative"], "metric": cost["metric"],
            "seconds": round(built["seconds"] + time.perf_counter() - start, 3)}


def accuracy_measure(problem: Problem) -> str:
    """``top1`` when ``--eval`` has labels and the model a classification output, else ``cosine``."""
    data, reference = _reference(problem.model, problem.eval, problem.input_shapes, problem.images)
    outputs = compare_outputs(reference, reference, data.labels, Criterion())
    return "top1" if any(o.accuracy_source is not None for o in outputs) else "cosine"


def accuracy(problem: Problem, artifact: Path) -> dict[str, float]:
    """Top-1 on ``--eval`` and its drop from the source's when the data has labels and the
    model a classification output; else the worst output cosine to the source (loss 1 − cosine)."""
    data, reference = _reference(problem.model, problem.eval, problem.input_shapes, problem.images)
    got = run_all(open_runner(artifact, threads=1, options=load_target(problem.target).runtime), data.batches)
    outputs = compare_outputs(reference, got, data.labels, Criterion())
    labeled = next((o for o in outputs if o.accuracy_source is not None), None)
    if labeled is not None:
        return {"accuracy": round(labeled.accuracy_artifact, 6), "accuracy_source": round(labeled.accuracy_source, 6),
                "loss": round(labeled.accuracy_source - labeled.accuracy_artifact, 6), "measure": "top1"}
    worst = min(float(o.cosine) for o in outputs)
    return {"accuracy": round(worst, 6), "accuracy_source": 1.0, "loss": round(1.0 - worst, 6), "measure": "cosine"}


@functools.cache
def _reference(model: str, path: str, input_shapes: tuple, images: ImagePreprocess) -> tuple[InputSet, dict[str, np.ndarray]]:
    """The eval samples and the source model's outputs on them, once per process."""
    data = eval_inputs(model, path, input_shapes, images)
    source = OrtRunner(load_proto(Path(model)).SerializeToString(), threads=1, optimization="disabled", user_file=Path(model).name)
    return data, run_all(source, data.batches)


def eval_inputs(model: str, path: str, input_shapes: tuple, images: ImagePreprocess) -> InputSet:
    """``--eval`` read for the canonical model's inputs (an InputDataError when they do not fit)."""
    canonical, _ = canonicalize(load(Path(model)), dict(input_shapes))
    return load_inputs(path, input_specs(canonical), images=images)
