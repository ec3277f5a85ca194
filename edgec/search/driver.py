"""``edgec optimize``: from a device and a budget to the best verified artifact.

The driver keeps one Optuna study (SQLite ``OUT/study.db`` unless ``--study`` names another
file or database URL) and asks and tells in this process; candidates are evaluated
(:func:`edgec.search.evaluate.evaluate`, the real build) on the executor, here or as Ray
tasks, and told in the order they were asked, so either executor gives the same study. Each trial stores its whole result in the study, so an
interrupted search resumes from it: finished trials are reused, not rebuilt, and settings
already evaluated are never built twice.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy

from edgec.build import canonicalize, input_specs
from edgec.checks import above, at_least, one_of, option, within
from edgec.errors import BudgetError, DeviceError, EdgecWarning, OptionError
from edgec.executors import EXECUTORS, Executor, make_executor
from edgec.images import ImagePreprocess
from edgec.lower import BACKENDS
from edgec.model import load
from edgec.outputs import OutputDir
from edgec.profile import get_device
from edgec.recipe import recipe_toml
from edgec.report import write_json
from edgec.search.cost import sha256, write_atomically
from edgec.search.evaluate import (Problem, accuracy_measure, build_settings, counted_in_task, evaluate, evaluate_all, evaluate_costs,
                                   outcome_result, settings_key, submit_evaluation)
from edgec.search.report import front, render
from edgec.search.space import Space, build_space, describe, pruning_sensitivity, recipe_steps
from edgec.search.strategies import STRATEGIES, run_greedy, run_sampler, sampler
from edgec.targets import load_target, same_arch
from edgec.verify import InputSet, load_inputs, random_inputs

CANDIDATE_MODULES = ("edgec.search.evaluate",)  # what a candidate's task imports, besides its backend
SENSITIVITY_SAMPLES = 64  # calibration batches the space's sensitivity is measured on
SENSITIVITY_FORMAT = 2  # of the cached sensitivity report: 2 added param_reduction
DEFAULT_MAX_DROP, DEFAULT_MIN_COSINE = 0.01, 0.99


@dataclasses.dataclass(frozen=True)
class Budgets:
    """What the chosen artifact must meet; at least one. ``speedup``: times cheaper than the
    fp32 build of the same target on the device; ``size_kb`` in KiB (1024 bytes)."""

    latency_ms: float | None = None
    speedup: float | None = None
    size_kb: float | None = None
    macs: int | None = None

    def __post_init__(self) -> None:
        for key, flag in FLAGS.items():
            above(option(key, flag), getattr(self, key), 0)
        if all(getattr(self, key) is None for key in FLAGS):
            raise OptionError("Give a budget to optimize for.",
                              hint="Pass one or more of --latency-budget MS, --speedup X, --size-budget KB, --macs-budget N.")

    def violations(self, result: Mapping[str, Any]) -> dict[str, float]:
        """Budget → how far ``result`` is over it, as a share of it (≤ 0: met)."""
        measured = {"latency_ms": result["cost"], "speedup": result["relative_cost"] * (self.speedup or 0),
                    "size_kb": result["size_bytes"] / 1024, "macs": result["macs"]}
        return {key: round(measured[key] / (1 if key == "speedup" else getattr(self, key)) - 1, 6)
                for key in FLAGS if getattr(self, key) is not None}

    def buys(self) -> tuple[str, ...]:
        """What meets these budgets: fewer ``macs`` (latency, speed-up, MACs) and/or ``params`` (size)."""
        kinds = {"latency_ms": "macs", "speedup": "macs", "macs": "macs", "size_kb": "params"}
        return tuple(dict.fromkeys(kinds[key] for key in FLAGS if getattr(self, key) is not None))

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


COSTS = ("measured", "predicted")
FLAGS = {"latency_ms": "--latency-budget", "speedup": "--speedup", "size_kb": "--size-budget", "macs": "--macs-budget"}


@dataclasses.dataclass(frozen=True)
class OptimizeOptions:
    eval: str  # labeled .npz → top-1 drop; else worst output cosine. Never the --calib/--finetune data.
    budgets: Budgets
    device: str = "local"
    devices: str | None = None
    calib: str | None = None
    finetune: Mapping[str, Any] | None = None  # the finetune step's options ({"data": ..., "epochs": ...}): a knob when given
    max_drop: float | None = None  # labeled --eval: largest top-1 drop (0.01 = one point); default 0.01
    min_cosine: float | None = None  # unlabeled --eval: lowest worst-output cosine; default 0.99
    strategy: str = "greedy"
    trials: int = 40
    time_budget_s: float | None = None
    seed: int = 0
    study: str | None = None  # a file or database URL; OUT/study.db by default
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    images: ImagePreprocess = ImagePreprocess()
    executor: str = "local"  # where candidates are built and measured: here, or on Ray (edgec.executors)
    ray_address: str | None = None  # an existing Ray cluster; a local Ray is started when None
    batch: int = 2  # candidates in flight at once (a window, or batches on a timed device); the same on every executor, so the same choice
    cost: str = "measured"  # "predicted": by the device's latency predictor, the Pareto front measured before choosing

    def __post_init__(self) -> None:
        one_of(option("strategy"), self.strategy, STRATEGIES)
        one_of(option("executor"), self.executor, EXECUTORS)
        one_of(option("cost"), self.cost, COSTS)
        at_least(option("batch"), self.batch, 1)
        at_least(option("trials"), self.trials, 1)
        above(option("time_budget_s", "--time-budget-s"), self.time_budget_s, 0)
        at_least(option("seed"), self.seed, 0)
        within(option("max_drop"), self.max_drop, 0, 1, include_high=False)
        within(option("min_cosine"), self.min_cosine, 0, 1)
        if self.max_drop is not None and self.min_cosine is not None:
            raise OptionError("--max-drop and --min-cosine exclude each other.",
                              hint="--max-drop for --eval data with labels (top-1), --min-cosine for data without.")


@dataclasses.dataclass
class OptimizeResult:
    search: dict[str, Any]  # what search.json holds
    chosen: dict[str, Any]  # the chosen candidate's result
    files: list[Path]


Progress = Callable[[int, int, dict[str, Any], dict[str, Any] | None], None]  # (done, total, last result, best feasible)


def optimize(model: str | Path, target: str, out_dir: str | Path, options: OptimizeOptions,
             progress: Progress | None = None) -> OptimizeResult:
    """Search ``options.strategy``'s candidates for the most accurate one meeting every budget
    and the accuracy bound; write it with its recipe, search.json and report.html to
    ``out_dir``. When none meets them, the closest is written to ``out_dir/closest`` and a
    BudgetError names it."""
    device = get_device(options.device, options.devices)
    spec = load_target(target)
    _check_device(options, device, spec)
    if options.cost == "predicted":  # a device without a fitted predictor fails now, naming `edgec device calibrate`
        from edgec.predict import PredictorStore, cache_dir

        PredictorStore(cache_dir(None), device.name).load()
    out = OutputDir(out_dir)
    try:
        return _search(model, target, spec, out, options, progress)
    except BaseException:
        out.discard()
        raise


def _search(model: str | Path, target: str, spec, out: OutputDir, options: OptimizeOptions, progress: Progress | None) -> OptimizeResult:
    problem = _problem(model, target, out.path, options)
    measure = accuracy_measure(problem)
    allowed = _allowed_loss(options, measure)
    executor = make_executor(options.executor, options.ray_address)
    try:
        executor.prepare(CANDIDATE_MODULES + (BACKENDS[spec.backend].module,))  # workers import while the space is measured
        space, sensitivity = _space(problem, spec, allowed, options)
        trials = _Trials(_study(problem, options, space, out.path), space, problem, options, allowed, progress, executor)
        return _run(trials, spec, sensitivity, measure, allowed, out)
    finally:
        executor.close()


def _run(trials: _Trials, spec, sensitivity: dict[str, Any], measure: str, allowed: float, out: OutputDir) -> OptimizeResult:
    """The reference build, the int8 baseline, the strategy's trials, then the choice."""
    reference = _open(trials)
    _run_strategy(trials, trials.options)
    int8 = trials.memo.get(settings_key(trials.space.settings(_int8_alone(trials.space))))
    return _finish(trials, {"fp32": reference, "int8": int8}, sensitivity, measure, allowed, out, spec)


def _open(trials: _Trials) -> dict[str, Any]:
    """The fp32 reference and the opening trials, and, where costs are counted in the task,
    the sampler's trials too in the same window; the reference's result."""
    space, options = trials.space, trials.options
    opening = _opening(trials)
    if counted_in_task(trials.problem):  # no candidate waits for another: one window from the reference on
        trials.run_window([space.start(), *opening], options.batch, sample=options.strategy != "greedy")
        return _referenced(trials, trials.reference)
    reference = _referenced(trials, trials.run_batch([space.start()], ahead=opening)[0])
    trials.run_batch(opening)
    return reference


def _referenced(trials: _Trials, reference: dict[str, Any]) -> dict[str, Any]:
    """``reference`` on disk and named in the problem (costs measured after are relative to it)."""
    if "error" in reference:
        raise BudgetError(f"The uncompressed fp32 build, the reference every cost is relative to, failed: {reference['error']}")
    reference = _materialize(trials.problem, reference)  # a shared study's reference may have been built elsewhere
    trials.problem = dataclasses.replace(trials.problem, reference=str(Path(reference["folder"]) / reference["artifact"]))
    return reference


def _problem(model: str | Path, target: str, out: Path, options: OptimizeOptions) -> Problem:
    """What every candidate shares, with absolute paths (a recipe and a task elsewhere read them)."""
    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    finetune = {**options.finetune, "data": absolute(options.finetune["data"])} if options.finetune else {}
    if finetune.get("budget_s") is not None:
        raise OptionError("A fine-tuning time budget (budget_s) makes a candidate's weights depend on the machine's load, "
                          "so a search with the same seed and study would not make the same choice.",
                          hint="Bound fine-tuning inside a search by epochs instead.")
    for name, path in (("--calib", options.calib), ("--finetune", finetune.get("data"))):
        if path is not None and absolute(path) == absolute(options.eval):
            raise OptionError(f"--eval is the {name} data: the search would judge candidates on samples they were fitted to.",
                              hint=f"Hold out separate samples for --eval; keep {name} for {name[2:]}.")
    return Problem(absolute(str(model)), target, options.device, absolute(options.eval), str(out.resolve() / ".search"),
                   absolute(options.devices), absolute(options.calib), options.seed,
                   tuple((k, tuple(v)) for k, v in options.input_shapes.items()), options.images, options.max_drop,
                   tuple(sorted(finetune.items())), cost=options.cost)


def _int8_alone(space: Space) -> dict[str, Any]:
    return {**space.start(), "precision": "int8"}


def _opening(trials: _Trials) -> list[dict[str, Any]]:
    """The fixed trials that follow the reference, as many as the trials left allow: int8
    alone (a baseline), and for the samplers the uniform levels (cheap to judge, and the
    front's anchors). They are built beside the reference (only their costs need its cost)."""
    space, fixed = trials.space, []
    if "int8" in space.levels["precision"]:
        fixed.append(_int8_alone(space))
    if trials.options.strategy != "greedy":
        fixed += [space.uniform(level) for level in range(1, max(len(v) for v in space.levels.values()))]
    return fixed[:max(trials.room(1 + len(fixed)) - 1, 0)]


def _run_strategy(trials: _Trials, options: OptimizeOptions) -> None:
    space = trials.space
    if options.strategy == "greedy":
        shortfall = lambda r: sum(max(v, 0.0) for v in options.budgets.violations(r).values())  # noqa: E731
        run_greedy(trials, space, trials.allowed, shortfall)
        return
    run_sampler(trials, options.batch)


def _check_device(options: OptimizeOptions, device, target) -> None:
    if not same_arch(device.arch, target.arch):
        raise DeviceError(f"Device '{device.name}' is {device.arch}, target '{target.name}' is {target.arch}: costs measured "
                          "there say nothing about the target.", hint="Pick a device of the target's architecture with --device.")
    if device.emulated and options.budgets.latency_ms is not None:
        raise OptionError(f"--latency-budget needs a timed device; '{device.name}' is emulated and counts instructions.",
                          hint="Use --speedup (instructions relative to fp32) there, or --device local / an SSH board.")


def _allowed_loss(options: OptimizeOptions, measure: str) -> float:
    """The loss (top-1 drop, or 1 − cosine) a candidate may have, from the option that fits --eval."""
    if measure == "top1":
        if options.min_cosine is not None:
            raise OptionError("--eval has labels, so accuracy is the top-1 drop: --min-cosine does not apply.", hint="Use --max-drop.")
        return DEFAULT_MAX_DROP if options.max_drop is None else options.max_drop
    if options.max_drop is not None:
        raise OptionError("--max-drop needs --eval data with a 'label' array and a classification output.",
                          hint="Pass labeled data, or bound the worst output cosine with --min-cosine.")
    return 1.0 - (DEFAULT_MIN_COSINE if options.min_cosine is None else options.min_cosine)


def _space(problem: Problem, target, allowed: float, options: OptimizeOptions) -> tuple[Space, dict[str, Any]]:
    """The space, from sensitivity on the calibration samples (seeded random ones with a
    warning), measured once per model and data: a resumed search reads it back."""
    canonical, _ = canonicalize(load(Path(problem.model)), dict(problem.input_shapes))
    identity = json.dumps([sha256(Path(problem.model)), problem.calib, problem.input_shapes, problem.images, problem.seed,
                           SENSITIVITY_SAMPLES, SENSITIVITY_FORMAT], default=str)
    cached = Path(problem.work) / f"sensitivity-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    if cached.is_file():
        report = json.loads(cached.read_text())
    else:
        report = pruning_sensitivity(canonical, _calibration(problem, input_specs(canonical)))
        write_atomically(cached, write_json(report))
    space = build_space(canonical, report, allowed, "int8" in target.criteria, target.backend == "ort", options.finetune is not None,
                        options.budgets.buys())
    return space, report


def _calibration(problem: Problem, specs) -> InputSet:
    if problem.calib:
        return load_inputs(problem.calib, specs, limit=SENSITIVITY_SAMPLES, images=problem.images)
    warnings.warn("No --calib: pruning sensitivity and int8 calibration use random inputs, so the space and the int8 "
                  "candidates are guesses. Pass --calib with real samples (not the --eval data).", EdgecWarning, stacklevel=4)
    return random_inputs(specs, seed=problem.seed + 1, count=SENSITIVITY_SAMPLES)


def _study(problem: Problem, options: OptimizeOptions, space: Space, out: Path) -> optuna.Study:
    """The study of this problem in the storage (created, or loaded to resume); trials an
    interrupt left running are marked failed."""
    storage = _storage(options.study or str(out / "study.db"))
    identity = json.dumps([hashlib.sha256(Path(problem.model).read_bytes()).hexdigest(),
                           problem.target, problem.device, problem.cost, problem.eval, problem.calib, problem.finetune, options.strategy,
                           space.to_dict()], sort_keys=True, default=str)
    name = f"edgec-{Path(problem.model).stem}-{options.strategy}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = _finished(optuna.load_study(study_name=name, storage=storage)) if name in optuna.get_all_study_names(storage) else []
    constraints = lambda trial: trial.user_attrs.get("constraints", [1.0])  # noqa: E731
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"], load_if_exists=True,
                                sampler=sampler(options.strategy, options.seed + len(done), options.trials, constraints))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def _storage(study: str) -> optuna.storages.RDBStorage:
    """``--study`` opened: a file path is a SQLite database, anything with ``://`` a URL."""
    url = study if "://" in study else f"sqlite:///{Path(study).resolve()}"
    try:
        return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise OptionError(f"--study {study} cannot be opened: {exc}".split("\n")[0],
                          hint="Give a SQLite file in a folder that exists, or a database URL whose driver is installed.") from None


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if "result" in t.user_attrs]


class _Trials:
    """The study's trials as strategies run them: fixed parameters (enqueued) or the
    sampler's. Settings evaluated before, in this session or the interrupted one, are reused:
    fixed parameters already evaluated cost no trial at all (greedy replays its path on
    resume), a sampler's repeat is told the stored result."""

    def __init__(self, study: optuna.Study, space: Space, problem: Problem, options: OptimizeOptions, allowed: float,
                 progress: Progress | None, executor: Executor):
        self.study, self.space, self.problem, self.options, self.allowed = study, space, problem, options, allowed
        self.executor = executor
        self.progress = progress or (lambda *_: None)
        finished = _finished(study)
        self.memo: dict[str, dict[str, Any]] = {}
        self.built: dict[str, dict[str, Any]] = {}  # builds made ahead of their trials, by settings key
        for trial in finished:  # judged again: a resumed search may have other budgets
            self.memo.setdefault(trial.user_attrs["result"]["key"], judged(trial.user_attrs["result"], options.budgets, allowed))
        self.done = len(finished)
        self.deadline = None if options.time_budget_s is None else time.monotonic() + options.time_budget_s
        self.best = _best(list(self.memo.values()))
        self.reference: dict[str, Any] | None = None  # the fp32 build's result, once run_window has it

    def left(self) -> bool:
        return self.done < self.options.trials and self._in_time()

    def run(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        return self.run_batch([params])[0]

    def run_batch(self, proposals: Sequence[Mapping[str, Any] | None], ahead: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
        """A trial per proposal (fixed parameters, or the sampler's with None), the new
        settings evaluated together on the executor, all told in proposal order: the same
        batches give the same study on any executor. The candidates of ``ahead`` (fixed
        parameters of later trials) are built in the same round, for those trials to reuse."""
        asked, results = [], {}
        for i, params in enumerate(proposals):
            known = None if params is None else self.memo.get(settings_key(self.space.settings(params)))
            if known is not None:
                results[i] = known
                continue
            if params is not None:
                self.study.enqueue_trial(dict(params))
            trial = self.study.ask(self.space.distributions())
            asked.append((i, trial, self.space.settings(trial.params)))
        fresh = list({settings_key(s): s for _, _, s in asked if settings_key(s) not in self.memo}.values())
        taken = {settings_key(s) for s in fresh} | set(self.memo) | set(self.built)
        later = [s for s in {settings_key(s): s for s in map(self.space.settings, ahead)}.values() if settings_key(s) not in taken]
        outcomes, made = evaluate_all(self.executor, self.problem, fresh, self.built, later)
        self.built.update(made)
        evaluated = {settings_key(s): r for s, r in zip(fresh, outcomes)}
        for i, trial, settings in asked:
            results[i] = self._tell(trial, self.memo.get(settings_key(settings)) or evaluated[settings_key(settings)])
        return [results[i] for i in range(len(proposals))]

    def run_window(self, fixed: Sequence[Mapping[str, Any]], width: int, sample: bool) -> None:
        """The trials of ``fixed`` (the first the fp32 reference), then the sampler's while
        ``sample`` and trials and time are left, with up to ``width`` evaluating at once: a
        trial is asked when the oldest in flight is told. So the sampler sees the same history
        at every ask on any executor (the same study), and Ray starts the next candidate as
        soon as a worker is free instead of waiting for a batch's slowest. Costs must be
        counted in the task (:func:`counted_in_task`): they are made relative here."""
        queue, flight, running = list(fixed), collections.deque(), {}
        while True:
            while len(flight) < width and (queue or sample) and self._room_beside(flight) and (self._in_time() or self.reference is None and not flight):
                flight.append(self._ask_and_submit(queue.pop(0) if queue else None, running))
            if not flight:
                return
            trial, settings, pending = flight.popleft()
            result = self._relative(outcome_result(pending.result(), settings) if pending else self.memo[settings_key(settings)])
            told = self._tell(trial, result) if trial is not None else result
            if self.reference is None:
                self.reference = told
                if "error" in told:
                    return  # the caller names the failed reference

    def _ask_and_submit(self, params: Mapping[str, Any] | None, running: dict[str, Any]) -> tuple:
        """(trial, settings, pending task): the trial None for fixed parameters evaluated
        before (they cost no trial), the task None for settings in the memo, and one task per
        settings in flight."""
        known = None if params is None else self.memo.get(settings_key(self.space.settings(params)))
        if known is not None:
            return None, known["settings"], None
        if params is not None:
            self.study.enqueue_trial(dict(params))
        trial = self.study.ask(self.space.distributions())
        settings = self.space.settings(trial.params)
        key = settings_key(settings)
        if key not in self.memo and key not in running:
            running[key] = submit_evaluation(self.executor, self.problem, settings)
        return trial, settings, running.get(key) if key not in self.memo else None

    def _room_beside(self, flight: Sequence[tuple]) -> bool:
        return self.done + sum(trial is not None for trial, _, _ in flight) < self.options.trials

    def _relative(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result``'s cost relative to the reference's (the reference's own: 1.0)."""
        reference = self.reference or result
        if "error" in result or "error" in reference:
            return result
        return {**result, "relative_cost": round(result["cost"] / reference["cost"], 6)}

    def _in_time(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline

    def _tell(self, trial: optuna.trial.Trial, result: dict[str, Any]) -> dict[str, Any]:
        result = judged({**result, "params": dict(trial.params), "trial": trial.number}, self.options.budgets, self.allowed)
        if "error" not in result:
            trial.set_user_attr("constraints", [*result["violations"].values(), result["loss"] - self.allowed])
        trial.set_user_attr("result", result)
        if "error" in result:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, [result["relative_cost"], result["loss"]])
        self.memo.setdefault(result["key"], result)
        self.done += 1
        self.best = _best([r for r in (self.best, result) if r is not None])
        self.progress(self.done, self.options.trials, result, self.best)
        return result

    def room(self, wanted: int) -> int:
        """How many of ``wanted`` trials fit in what is left of the search (0 when time is up)."""
        return min(wanted, self.options.trials - self.done) if self.left() else 0


def _best(results: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The most accurate feasible result; of equals, the one with fewest MACs, then the
    smallest, then the cheapest. Measured latency decides last: on a busy machine it moves
    between runs, and the choice under one seed should not."""
    feasible = [r for r in results if r.get("feasible")]
    return min(feasible, key=_preference) if feasible else None


def _preference(result: dict[str, Any]) -> tuple:
    return result["loss"], result["macs"], result["size_bytes"], result["relative_cost"], result["trial"]


def _closest(results: Sequence[dict[str, Any]], allowed: float) -> dict[str, Any]:
    """The result nearest to feasible: least summed overshoot, the accuracy's relative to the allowed loss."""
    def overshoot(r: dict[str, Any]) -> float:
        return sum(max(v, 0.0) for v in r["violations"].values()) + max(r["loss"] - allowed, 0.0) / max(allowed, 1e-3)
    return min(results, key=lambda r: (overshoot(r), r["trial"]))


def _finish(trials: _Trials, baselines: dict[str, dict[str, Any] | None], sensitivity: dict[str, Any], measure: str,
            allowed: float, out: OutputDir, target) -> OptimizeResult:
    """Choose, add the uniform-pruning baselines, and write everything."""
    results = sorted((judged(t.user_attrs["result"], trials.options.budgets, allowed) for t in _finished(trials.study)),
                     key=lambda r: r["trial"])
    ok = [r for r in results if "error" not in r]
    if trials.problem.cost == "predicted" or not get_device(trials.problem.device, trials.problem.devices).emulated:
        ok = _measured_front(trials, ok)  # choose among candidates (re)measured apart from the search
        measured = {r["trial"]: r for r in ok}
        results = [measured.get(r["trial"], r) for r in results]
    chosen = _best(ok) or _closest(ok, allowed)
    baselines = {**baselines, **_uniform_baselines(trials, chosen, baselines["fp32"])}
    search = search_record(results, chosen, baselines, trials, sensitivity, measure, allowed)
    chosen = _materialize(trials.problem, chosen)
    files = candidate_files(chosen, trials.problem, search)
    pages = {"report.html": render(search, target.name).encode(), "search.json": write_json(search)}
    if chosen["feasible"]:
        written = out.commit({**files, **pages}, last="search.json")
        return OptimizeResult(search, chosen, written)
    OutputDir(out.path / "closest").commit(files, last="report.json")
    out.commit(pages, last="search.json")
    raise BudgetError(f"No candidate of {len(results)} met every budget within the accuracy bound. The closest: "
                      f"{describe(chosen['settings'])}, cost {chosen['cost']:.4g} {chosen['metric']} ({chosen['relative_cost']:.3f}× fp32), "
                      f"{_accuracy_text(chosen, measure)}; misses {', '.join(_misses(chosen, allowed, measure))}. "
                      f"Its artifact is in {out.path / 'closest'}, the search in {out.path / 'report.html'}.",
                      hint="Loosen a budget or the accuracy bound, give more --trials, or --finetune data to recover accuracy.")


MEASURED_CHOICES = 4  # the feasible candidates measured (again) besides the front before choosing


def _measured_front(trials: _Trials, ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The candidates to choose from when the search's costs may mislead: the Pareto front
    of ``ok`` and the ``MEASURED_CHOICES`` candidates the choice would prefer, their costs
    measured on the device apart from the search. With ``--cost predicted`` the predictions
    are kept as ``predicted_cost``; on a timed device (``local``, an SSH board) the search's
    own measurement as ``search_cost``: the cheapest of many noisy timings is biased low (a
    pruned MobileNetV3 timed 0.57× fp32 in a search here, 0.97× measured anew)."""
    preferred = sorted((r for r in ok if r.get("feasible")), key=_preference)[:MEASURED_CHOICES]
    points = list({r["trial"]: r for r in [ok[i] for i in front(ok)] + preferred}.values())
    predicted = trials.problem.cost == "predicted"
    again = dataclasses.replace(trials.problem, cost="measured" if predicted else "confirmed")
    kept = "predicted" if predicted else "search"
    return [judged({**m, "trial": p["trial"], "params": p["params"], "seconds": p["seconds"], f"{kept}_cost": p["cost"],
                    f"{kept}_relative_cost": p["relative_cost"]}, trials.options.budgets, trials.allowed)
            for p, m in zip(points, evaluate_costs(trials.executor, again, points))]


def _accuracy_text(result: dict[str, Any], measure: str) -> str:
    if measure == "top1":
        return f"top-1 {result['accuracy']:.4f} ({result['loss'] * 100:+.2f} pt drop)"
    return f"worst output cosine {result['accuracy']:.5f}"


def _misses(result: dict[str, Any], allowed: float, measure: str) -> list[str]:
    missed = [f"{FLAGS[k]} by {v:.1%}" for k, v in result["violations"].items() if v > 0]
    if result["loss"] > allowed:
        missed.append("--max-drop" if measure == "top1" else "--min-cosine")
    return missed


UNIFORM_MATCH_STEPS, UNIFORM_MATCH_TOLERANCE = 2, 0.02  # re-aims at the chosen cost, and how close is equal


def _uniform_baselines(trials: _Trials, chosen: dict[str, Any], reference: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Uniform-rate pruning at ``chosen``'s precision: removing as many MACs as it does
    (``uniform_same_macs``), and re-aimed until it costs the same on the device (``uniform``;
    equal MACs is not equal cost: on the emulated A76 it was 2% cheaper), taking cost as
    proportional to the MACs left. Both None when the chosen point removes no MACs."""
    reduction = round(1 - chosen["macs"] / reference["macs"], 4)
    if reduction <= 0:
        return {"uniform_same_macs": None, "uniform": None}
    tries = [_uniform(trials, chosen, reduction)]
    for _ in range(UNIFORM_MATCH_STEPS):
        last = tries[-1]
        if "error" in last or abs(last["relative_cost"] / chosen["relative_cost"] - 1) <= UNIFORM_MATCH_TOLERANCE:
            break
        reduction = round(min(max(1 - (1 - reduction) * chosen["relative_cost"] / last["relative_cost"], 0.0), 0.95), 4)
        tries.append(_uniform(trials, chosen, reduction))
    measured = [t for t in tries if "error" not in t]
    closest = min(measured, key=lambda t: abs(t["relative_cost"] / chosen["relative_cost"] - 1)) if measured else tries[-1]
    return {"uniform_same_macs": tries[0], "uniform": closest}  # timing noise can move a step away: keep the nearest


def _uniform(trials: _Trials, chosen: dict[str, Any], reduction: float) -> dict[str, Any]:
    settings = {**chosen["settings"], "prune": {}, "factorize": {}, "uniform_prune": reduction}
    known = trials.memo.get(settings_key(settings))
    return judged(known or evaluate_all(trials.executor, trials.problem, [settings])[0][0], trials.options.budgets, trials.allowed)


def judged(result: dict[str, Any], budgets: Budgets, allowed: float) -> dict[str, Any]:
    """``result`` with how far it is over each budget and whether it meets them all and the accuracy bound."""
    if "error" in result:
        return result
    violations = budgets.violations(result)
    return {**result, "violations": violations, "feasible": result["loss"] <= allowed and all(v <= 0 for v in violations.values())}


def _materialize(problem: Problem, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its build on disk: a study shared from elsewhere (or a cleaned work
    folder) has the result but not the files, and the build is deterministic, so rebuild."""
    folder = Path(result.get("folder", ""))
    if (folder / result["artifact"]).is_file() and sha256(folder / result["artifact"]) == result["sha256"]:
        return result
    return {**result, "folder": evaluate(problem, result["settings"])["folder"]}


def candidate_files(result: dict[str, Any], problem: Problem, search: dict[str, Any]) -> dict[str, bytes]:
    """The candidate's build (artifacts, compressed ONNX, report.json with an ``optimize``
    entry saying whether it meets the budgets) and the recipe that rebuilds it."""
    folder = Path(result["folder"])
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name not in ("report.json", "report.html")}
    report = json.loads((folder / "report.json").read_text())
    report["optimize"] = {key: search[key] for key in ("strategy", "device", "budgets", "accuracy")}
    report["optimize"].update({key: result[key] for key in ("cost", "relative_cost", "metric", "loss", "violations", "feasible")})
    files["recipe.toml"] = recipe_text(result, problem).encode()
    files["report.json"] = write_json(report)
    return files


def recipe_text(result: dict[str, Any], problem: Problem) -> str:
    """recipe.toml: the candidate's steps and build settings, headed by how to rebuild it."""
    model = Path(problem.model)
    shapes = "".join(f" --input-shape {k}={'x'.join(map(str, v))}" for k, v in problem.input_shapes)
    header = (f"# Written by edgec optimize. `edgec build {model} --target {problem.target} --recipe recipe.toml{shapes}`\n"
              f"# rebuilds {result['artifact']} (sha256 {result['sha256']}) byte for byte.\n")
    return header + recipe_toml(recipe_steps(result["settings"], dict(problem.finetune) or None), build_settings(problem, result["settings"]))


PUBLIC = ("trial", "settings", "cost", "relative_cost", "metric", "accuracy", "loss", "size_bytes", "macs", "seconds",
          "feasible", "violations", "artifact", "sha256", "error", "predicted_cost", "predicted_relative_cost", "search_cost",
          "search_relative_cost")


def _public(result: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if result is None else {key: result[key] for key in PUBLIC if key in result}


def search_record(results: list[dict[str, Any]], chosen: dict[str, Any], baselines: dict[str, dict[str, Any] | None],
                  trials: _Trials, sensitivity: dict[str, Any], measure: str, allowed: float) -> dict[str, Any]:
    """What search.json holds: every candidate, the chosen one's index (or the closest's), the baselines."""
    index = next(i for i, r in enumerate(results) if r["trial"] == chosen["trial"])
    return {
        "model": trials.problem.model, "target": trials.problem.target, "device": trials.problem.device,
        "strategy": trials.options.strategy, "seed": trials.options.seed, "trials": trials.done,
        "budgets": trials.options.budgets.to_dict(), "accuracy": {"measure": measure, "allowed_loss": allowed},
        "space": trials.space.to_dict(),
        "candidates": [_public(r) for r in results],
        "chosen": index if chosen["feasible"] else None, "closest": None if chosen["feasible"] else index,
        "baselines": {name: _public(r) for name, r in baselines.items()},
        "sensitivity": sensitivity,
    }
