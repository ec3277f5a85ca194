"""Search strategies: which settings to try next.

Every strategy proposes Optuna parameters and learns only from the trials told to the study
(``Trials.run``), so all four share one driver, one storage and one memo of evaluated
settings:

* ``greedy`` — edgec's own, after NetAdapt (Yang et al. 2018): from the current point, turn
  each of the ``GREEDY_PROPOSALS`` most promising knobs one level further, measure them, and
  move to the proposal that buys the most cost per unit of accuracy lost while accuracy
  holds (or to all the good proposals at once, when that measures better); stop once every
  budget is met. Promise is MACs removed (or the cost int8 saves)
  over the damage sensitivity predicts, so cheap, harmless moves are measured first. With
  ``--finetune`` data, a step whose every shrinking proposal loses too much accuracy is
  measured again with fine-tuning on, and the walk goes on fine-tuned from the best of those
  that hold (NetAdapt's short-term fine-tuning, paid for only where one-shot compression
  stops): training is the slowest part of a build, so no candidate trains that need not. A
  walk that met the budgets one-shot with some accuracy lost builds its last point once more,
  fine-tuned (NetAdapt's long-term fine-tuning).
* ``evolutionary`` — Optuna's NSGA-II on (cost, loss) with the budgets as constraints.
* ``bayesian`` — Optuna's TPE on the same two objectives and constraints.
* ``random`` — Optuna's random sampler, the baseline a search must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import optuna

STRATEGIES = ("greedy", "evolutionary", "bayesian", "random")
GREEDY_PROPOSALS = 4  # knobs measured per greedy step


class Trials(Protocol):
    """What a strategy drives: run one trial or a batch of them (fixed parameters, or the
    sampler's with None), evaluated at once where the executor can."""

    def run(self, params: Mapping[str, Any] | None) -> dict[str, Any]: ...

    def run_batch(self, proposals: Sequence[Mapping[str, Any] | None]) -> list[dict[str, Any]]: ...

    def left(self) -> bool: ...

    def room(self, wanted: int) -> int: ...


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


def run_greedy(trials: Trials, start: Mapping[str, Any], moves: Callable[[Mapping[str, Any]], list[tuple[str, dict[str, Any]]]],
               promise: Callable[[str, Mapping[str, Any]], float], allowed_loss: float,
               shortfall: Callable[[dict[str, Any]], float],
               recovered: Callable[[Mapping[str, Any]], dict[str, Any] | None] = lambda params: None) -> None:
    """NetAdapt-style shrinking from ``start`` (see the module docstring). Progress is
    ``shortfall``: how far a result is over the budgets, so a size budget is bought with what
    shrinks the file and a speed-up with what the device runs faster. A knob whose move did
    not lower it (factorizing a small layer adds kernels; int8 on a CPU without 8-bit dot
    products) is not proposed again: its promise was wrong here. ``recovered``: the same
    parameters with accuracy recovery (fine-tuning) turned on, None where it is on or not offered."""
    current, useless = trials.run(start), set()
    while "error" not in current and shortfall(current) > 0 and trials.left():
        ranked = sorted(((promise(name, current["params"]), name, params) for name, params in moves(current["params"])
                         if name not in useless), key=lambda m: -m[0])
        measured, lossy = [], []
        proposals = [m for m in ranked if m[0] > 0][:trials.room(GREEDY_PROPOSALS)]
        for (_, name, _), result in zip(proposals, trials.run_batch([params for _, _, params in proposals])):
            if "error" in result or shortfall(result) >= shortfall(current):
                useless.add(name)
            else:
                (measured if result["loss"] <= allowed_loss else lossy).append(result)
        if not measured:
            measured = _recovering(trials, current, lossy, recovered, allowed_loss, shortfall)
        if not measured:
            return
        best = max(measured, key=lambda r: ((shortfall(current) - shortfall(r)) / max(r["loss"] - current["loss"], 1e-3), -r["trial"]))
        current = _combined(trials, current, measured, best, allowed_loss, shortfall)
    _fine_tuned_at_last(trials, current, recovered, shortfall)


def _fine_tuned_at_last(trials: Trials, current: dict[str, Any], recovered: Callable[[Mapping[str, Any]], dict[str, Any] | None],
                        shortfall: Callable[[dict[str, Any]], float]) -> None:
    """The point that met the budgets once more, fine-tuned, if it lost accuracy one-shot
    (NetAdapt's long-term fine-tuning of the final network): the choice takes whichever of
    the two is more accurate, at the same cost."""
    final = recovered(current["params"]) if "error" not in current and shortfall(current) <= 0 and current["loss"] > 0 else None
    if final is not None and trials.left():
        trials.run(final)


def _recovering(trials: Trials, current: dict[str, Any], lossy: list[dict[str, Any]],
                recovered: Callable[[Mapping[str, Any]], dict[str, Any] | None], allowed_loss: float,
                shortfall: Callable[[dict[str, Any]], float]) -> list[dict[str, Any]]:
    """The proposals that lost too much accuracy, measured again with recovery on: those that
    now hold accuracy and still fall shorter of the budgets than ``current``."""
    retries = [params for params in (recovered(r["params"]) for r in lossy) if params is not None][:trials.room(GREEDY_PROPOSALS)]
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
    together = trials.run(params)
    fits = "error" not in together and together["loss"] <= allowed_loss
    return together if fits and shortfall(together) < shortfall(best) else best
