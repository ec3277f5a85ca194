"""Search strategies: which settings to try next.

Every strategy proposes Optuna parameters and learns only from the trials told to the study
(``Trials.run``), so all four share one driver, one storage and one memo of evaluated
settings:

* ``greedy`` — edgec's own, after NetAdapt (Yang et al. 2018): from the current point, turn
  each of the ``GREEDY_PROPOSALS`` most promising knobs one level further, measure them, and
  move to the proposal that buys the most cost per unit of accuracy lost while accuracy
  holds (or to all the good proposals at once, when that measures better); stop once every
  budget is met. Promise is MACs removed (or the cost int8 saves) over the damage
  sensitivity predicts, so cheap, harmless moves are measured first. With ``--finetune``
  data, a step whose every shrinking proposal loses too much accuracy is measured again
  with fine-tuning on, and the walk goes on fine-tuned from the best of those that hold
  (NetAdapt's short-term fine-tuning, paid for only where one-shot compression stops):
  training is the slowest part of a build, so no candidate trains that need not. The walk
  also goes fine-tuned where one-shot steps creep: when steps the size of the last one
  would need more trials than are left. From then on, each step also measures the jump:
  every least pruned group one level further at once, fine-tuned. Uniform pruning takes
  such steps, and fine-tuned they reach budgets that single moves creep towards (a
  MobileNetV2 walk spent 29 builds on 0.56 → 0.48 of fp32 one-shot and ran out of trials
  at 0.43; its uniform level, fine-tuned, cost 0.31 at 0.7 points). A walk that met the
  budgets one-shot with some accuracy lost builds its last point once more, fine-tuned
  (NetAdapt's long-term fine-tuning).
* ``evolutionary`` — Optuna's NSGA-II on (cost, loss) with the budgets as constraints.
* ``bayesian`` — Optuna's TPE on the same two objectives and constraints.
* ``random`` — Optuna's random sampler, the baseline a search must beat.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import optuna

STRATEGIES = ("greedy", "evolutionary", "bayesian", "random")
GREEDY_PROPOSALS = 4  # single moves measured per greedy step, beside the jump
JUMP = "uniform"  # the jump's name among the knobs (Space.jump)


class Trials(Protocol):
    """What a strategy drives: run one trial or a batch of them (fixed parameters, or the
    sampler's with None), evaluated at once where the executor can."""

    def run(self, params: Mapping[str, Any] | None) -> dict[str, Any]: ...

    def run_batch(self, proposals: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]: ...

    def left(self) -> bool: ...

    def room(self, wanted: int) -> int: ...


class Moves(Protocol):
    """What greedy walks (:class:`edgec.search.space.Space`): settings as Optuna parameters."""

    def start(self) -> dict[str, Any]: ...

    def neighbours(self, params: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]: ...

    def promise(self, name: str, params: Mapping[str, Any]) -> float: ...

    def jump(self, params: Mapping[str, Any]) -> dict[str, Any] | None: ...

    def recovered(self, params: Mapping[str, Any]) -> dict[str, Any] | None: ...


def sampler(strategy: str, seed: int, trials: int, constraints: Callable[[optuna.trial.FrozenTrial], list[float]]
            ) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``strategy`` (greedy only replays fixed parameters through it)."""
    if strategy == "evolutionary":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(20, trials // 3)), seed=seed, constraints_func=constraints)
    if strategy == "bayesian":
        return optuna.samplers.TPESampler(n_startup_trials=max(4, min(10, trials // 4)), seed=seed, constraints_func=constraints)
    return optuna.samplers.RandomSampler(seed=seed)


def run_sampler(trials: Trials, batch: int) -> None:
    """Optuna's strategies: ask the sampler ``batch`` trials at a time until the trials or the time run out."""
    while trials.left():
        trials.run_batch([None] * trials.room(batch))


def run_greedy(trials: Trials, space: Moves, allowed_loss: float, shortfall: Callable[[dict[str, Any]], float]) -> None:
    """NetAdapt-style shrinking from ``space.start()`` (see the module docstring). Progress
    is ``shortfall``: how far a result is over the budgets, so a size budget is bought with
    what shrinks the file and a speed-up with what the device runs faster. A knob whose move
    did not lower it (factorizing a small layer adds kernels; int8 on a CPU without 8-bit
    dot products) is not proposed again: its promise was wrong here."""
    current, useless, pace = trials.run(space.start()), set(), math.inf
    while "error" not in current and shortfall(current) > 0 and trials.left():
        measured, lossy = [], []
        origin = current["params"]
        if _out_of_reach(trials, shortfall(current), pace):
            origin = space.recovered(origin) or origin  # one-shot steps creep: fine-tuned from here
        proposals = _proposals(trials, space, origin, useless)
        for (name, _), result in zip(proposals, trials.run_batch([params for _, params in proposals])):
            if "error" in result or shortfall(result) >= shortfall(current):
                useless.add(name)
            else:
                (measured if result["loss"] <= allowed_loss else lossy).append(result)
        if not measured:
            measured = _recovering(trials, current, lossy, space, allowed_loss, shortfall)
        if not measured:
            return
        best = max(measured, key=lambda r: ((shortfall(current) - shortfall(r)) / max(r["loss"] - current["loss"], 1e-3), -r["trial"]))
        before, current = shortfall(current), _combined(trials, current, measured, best, allowed_loss, shortfall)
        pace = before - shortfall(current)
    _fine_tuned_at_last(trials, current, space.recovered, shortfall)


def _out_of_reach(trials: Trials, shortfall: float, pace: float) -> bool:
    """Whether steps that close ``pace`` of the shortfall each (the last step's) would need
    more trials than are left: then the walk goes fine-tuned at once, where steps are bigger."""
    needed = math.ceil(shortfall / pace * (GREEDY_PROPOSALS + 1)) if pace > 0 else 0  # a step: the moves, then all at once
    return trials.room(needed) < needed


def _proposals(trials: Trials, space: Moves, params: Mapping[str, Any], useless: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """One step's moves from ``params``, by name: once the walk is fine-tuned, the jump
    first; then the ``GREEDY_PROPOSALS`` most promising single moves (those that shrink the model)."""
    jump = space.jump(params) if space.recovered(params) is None and JUMP not in useless else None
    ranked = sorted(((space.promise(name, params), name, moved) for name, moved in space.neighbours(params)
                     if name not in useless), key=lambda m: -m[0])
    singles = [(name, moved) for promise, name, moved in ranked if promise > 0]
    moves = ([(JUMP, jump)] if jump else []) + singles[:GREEDY_PROPOSALS]
    return moves[:trials.room(len(moves))]


def _fine_tuned_at_last(trials: Trials, current: dict[str, Any], recovered: Callable[[Mapping[str, Any]], dict[str, Any] | None],
                        shortfall: Callable[[dict[str, Any]], float]) -> None:
    """The point that met the budgets once more, fine-tuned, if it lost accuracy one-shot
    (NetAdapt's long-term fine-tuning of the final network): the choice takes whichever of
    the two is more accurate, at the same cost."""
    final = recovered(current["params"]) if "error" not in current and shortfall(current) <= 0 and current["loss"] > 0 else None
    if final is not None and trials.left():
        trials.run(final)


def _recovering(trials: Trials, current: dict[str, Any], lossy: list[dict[str, Any]], space: Moves, allowed_loss: float,
                shortfall: Callable[[dict[str, Any]], float]) -> list[dict[str, Any]]:
    """The jump from ``current`` (one-shot until now), and the proposals that lost too much
    accuracy measured again with recovery on: those that now hold accuracy and still fall
    shorter of the budgets than ``current``."""
    jump = space.jump(current["params"]) if space.recovered(current["params"]) is not None else None
    retries = [params for params in (jump, *(space.recovered(r["params"]) for r in lossy)) if params is not None]
    retries = retries[:trials.room(GREEDY_PROPOSALS)]
    return [r for r in trials.run_batch(retries) if "error" not in r and r["loss"] <= allowed_loss
            and shortfall(r) < shortfall(current)] if retries else []


def _combined(trials: Trials, current: dict[str, Any], measured: list[dict[str, Any]], best: dict[str, Any],
              allowed_loss: float, shortfall: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """Every good move of this step at once, when that holds accuracy and falls shorter of
    the budgets than the best single move: one extra trial that can save a step per move
    (one move a step reached 0.75× fp32 on MobileNetV2 in 22 trials)."""
    if len(measured) < 2 or not trials.left():
        return best
    params = dict(current["params"])
    for result in measured:
        params.update({k: v for k, v in result["params"].items() if v != current["params"][k]})
    together = next((r for r in measured if r["params"] == params), None) or trials.run(params)  # the jump may be all of them
    fits = "error" not in together and together["loss"] <= allowed_loss
    return together if fits and shortfall(together) < shortfall(best) else best
