"""The search space of ``edgec optimize``: which knobs a candidate turns, and how far.

A candidate's *settings* are plain data (JSON, and Optuna's parameters one to one)::

    {"precision": "int8",                       # or "fp32"
     "prune": {"/stage2/conv1/Conv": 0.5, ...},   # channel group (its first layer) → rate
     "factorize": {"/fc/Gemm": 0.3, ...},         # layer → share of its MACs factorized away
     "keep_float": ["/conv0/Conv"],               # int8 layers kept float (ONNX Runtime only)
     "finetune": False}                           # train after compressing (with --finetune)

The space starts from per-group pruning sensitivity (:mod:`edgec.sensitivity`, measured on
the calibration samples, never on ``--eval``): a group whose pruning alone buys under
``MIN_GROUP_SHARE`` of the MACs (of the weights, for a size budget) is left whole, and a
group gets only the rates whose damage alone stays under ``SENSITIVITY_LIMIT`` times the
allowed loss and that the build's rounding of channel counts tells apart (with
``--finetune`` data, every rate the rounding tells apart: training recovers much of the
damage one-shot sensitivity measures). The digits MobileNetV2 (ORT) keeps 8 of its 10
groups with 1–3 levels each, 3 factorization knobs, precision and 2 float layers: 3·10⁶
points, which a greedy walk of single-level moves crosses in a few dozen builds.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
from collections.abc import Callable, Mapping
from typing import Any

import onnx_ir as ir
import optuna

from edgec.analysis import layer_table
from edgec.passes.channel_pruning import ChannelPruningOptions, channel_groups
from edgec.passes.channels import ChannelGraph
from edgec.recipe import Step
from edgec.sensitivity import sensitivity
from edgec.verify import InputSet

PRUNE_RATES = (0.25, 0.5, 0.75)  # levels a group may take (0 = whole); round_to 8 makes finer ones moot on small nets
FACTORIZE_LEVELS = (0.3, 0.6)  # shares of a layer's MACs factorization may remove
FACTORIZED_LAYERS = 3  # the largest layers (by MACs, or weights for a size budget) get a factorization knob
MIN_GROUP_SHARE = 0.01  # a group whose most aggressive rate removes less of the MACs (or weights) stays whole
SENSITIVITY_LIMIT = 4.0  # rates whose damage alone exceeds this many times the allowed loss are not offered
FACTORIZABLE = ("Conv", "Gemm", "MatMul")
PROMISE_FLOOR = 1e-3  # damage added to every prediction, so harmless moves rank by what they buy
INT8_GUESS = (0.5, 0.002)  # int8 before it is measured: about half the cost, little damage (README, bench)


@dataclasses.dataclass(frozen=True)
class Space:
    """The knobs and their levels; ``levels`` keys are Optuna parameter names."""

    levels: Mapping[str, tuple[Any, ...]]
    # knob → level → (share of what the budgets buy it removes, damage predicted alone): greedy's
    # order of trying moves. Pruning's come from sensitivity; others are guesses (see build_space).
    predicted: Mapping[str, Mapping[Any, tuple[float, float]]] = dataclasses.field(default_factory=dict)

    def distributions(self) -> dict[str, optuna.distributions.CategoricalDistribution]:
        return {name: optuna.distributions.CategoricalDistribution(values) for name, values in self.levels.items()}

    def start(self) -> dict[str, Any]:
        """The uncompressed fp32 model: every knob at its first level."""
        return {name: values[0] for name, values in self.levels.items()}

    def settings(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna parameters → settings (see the module docstring)."""
        return {
            "precision": params.get("precision", "fp32"),
            "prune": {name[6:]: rate for name, rate in params.items() if name.startswith("prune:") and rate},
            "factorize": {name[10:]: level for name, level in params.items() if name.startswith("factorize:") and level},
            # a factorized layer is gone from the model (its factors replace it): nothing to keep float
            "keep_float": sorted(name[6:] for name, kept in params.items() if name.startswith("float:") and kept
                                 and params.get("precision") == "int8" and not params.get(f"factorize:{name[6:]}")),
            "finetune": bool(params.get("finetune", False)),
        }

    def neighbours(self, params: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Each knob turned one level further than in ``params`` (greedy's moves), by knob name."""
        moves = []
        for name, values in self.levels.items():
            index = values.index(params[name])
            if index + 1 < len(values):
                moves.append((name, {**params, name: values[index + 1]}))
        return moves

    def promise(self, name: str, params: Mapping[str, Any]) -> float:
        """How much turning knob ``name`` one level further from ``params`` should buy per
        damage done (0 for knobs that do not shrink the model: float layers, fine-tuning)."""
        table = self.predicted.get(name)
        if table is None:
            return 0.0
        values = self.levels[name]
        now, following = params[name], values[values.index(params[name]) + 1]
        share = table[following][0] - table[now][0]
        return share / (table[following][1] + PROMISE_FLOOR)

    def jump(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """Greedy's jump from ``params``: every pruning knob at the lowest level any of them
        is at turned one level further (uniform pruning's step for the least pruned
        groups), fine-tuned. None without data to train on (one-shot, such a step loses
        what fine-tuning wins back) or where it moves fewer than two knobs (it is then one
        of the single moves)."""
        behind = {name: values.index(params[name]) for name, values in self.levels.items()
                  if name.startswith("prune:") and values.index(params[name]) + 1 < len(values)}
        floor = min(behind.values(), default=0)
        raised = {name: self.levels[name][floor + 1] for name, index in behind.items() if index == floor}
        return {**params, **raised, "finetune": True} if "finetune" in self.levels and len(raised) > 1 else None

    def recovered(self, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """``params`` with fine-tuning turned on (greedy's recovery from a step that lost too
        much accuracy), or None where it is on already or there is no data to train on."""
        if "finetune" not in self.levels or params["finetune"]:
            return None
        return {**params, "finetune": True}

    def uniform(self, level: int) -> dict[str, Any]:
        """Every pruning knob at its ``level``-th level (or its last), the rest at the start."""
        return {name: values[min(level, len(values) - 1)] if name.startswith("prune:") else values[0]
                for name, values in self.levels.items()}

    def to_dict(self) -> dict[str, list[Any]]:
        return {name: list(values) for name, values in self.levels.items()}


def pruning_sensitivity(model: ir.Model, calibration: InputSet) -> dict[str, Any]:
    """Each group pruned alone at ``PRUNE_RATES``, re-fitted as the build re-fits (without
    re-fitting, a quarter of MobileNetV2's first conv cost 47 points of top-1, with it 4)."""
    return sensitivity(model, calibration, calibration, PRUNE_RATES, importance="l2", reconstruct=True)


def build_space(model: ir.Model, report: dict[str, Any], allowed_loss: float, int8: bool, keep_float: bool,
                finetune: bool, buys: tuple[str, ...] = ("macs",)) -> Space:
    """The space for ``model`` (canonical) from its pruning sensitivity ``report``.

    ``allowed_loss`` is the top-1 drop (labeled calibration) or 1 − cosine the user allows;
    ``int8``: the target can quantize; ``keep_float``: its backend keeps single layers float;
    ``finetune``: candidates may train, so no rate is cut for its one-shot damage (greedy
    still tries the least damaging first). The cut had kept keras_cnn's search from the
    rates that uniform pruning, fine-tuned, reached at a cost the search missed.
    ``buys``: what the budgets are met with, ``macs`` (speed, MACs) and/or ``params`` (size):
    the knobs go to the layers that hold most of it, and greedy's promise counts it."""
    levels: dict[str, tuple[Any, ...]] = {"precision": ("fp32", "int8") if int8 else ("fp32",)}
    predicted: dict[str, dict[Any, tuple[float, float]]] = {"precision": {"fp32": (0.0, 0.0), "int8": INT8_GUESS}}
    limit = math.inf if finetune else SENSITIVITY_LIMIT * allowed_loss
    for table in (_pruning_knobs(model, report, limit, buys), _factorization_knobs(model, allowed_loss, buys)):
        predicted.update(table)
        levels.update({name: tuple(by_level) for name, by_level in table.items()})  # the levels, in order
    if int8 and keep_float and _mac_layers(model):
        levels.update({f"float:{name}": (False, True) for name in dict.fromkeys([_first_layer(model), _last_layer(model)]) if name})
    if finetune:
        levels["finetune"] = (False, True)
    return Space(levels, predicted)


REDUCTIONS = {"macs": "mac_reduction", "params": "param_reduction"}  # what a budget buys → its key in sensitivity


def _pruning_knobs(model: ir.Model, report: dict[str, Any], limit: float, buys: tuple[str, ...]
                   ) -> dict[str, dict[float, tuple[float, float]]]:
    """Group knob → rate → (share bought, damage alone): the rates whose damage stays within
    ``limit`` and that the build's rounding tells apart, for groups that buy ``MIN_GROUP_SHARE``."""
    key = "top1_drop" if report["samples"]["labeled"] else "relative_error"
    removable, knobs = _removable(model), {}
    for group in report["groups"]:
        curve = [p for p in group["curve"] if p[key] <= limit]
        counts = [removable[group["layers"][0]](p["rate"]) for p in curve]
        curve = [p for i, p in enumerate(curve) if counts[i] > max([0, *counts[:i]])]
        if curve and max(_bought(p, buys) for p in group["curve"]) >= MIN_GROUP_SHARE:
            knobs[f"prune:{group['layers'][0]}"] = {0.0: (0.0, 0.0), **{p["rate"]: (_bought(p, buys), max(p[key], 0.0)) for p in curve}}
    return knobs


def _bought(point: Mapping[str, float], buys: tuple[str, ...]) -> float:
    return sum(point[REDUCTIONS[kind]] for kind in buys)


def _factorization_knobs(model: ir.Model, allowed_loss: float, buys: tuple[str, ...]) -> dict[str, dict[float, tuple[float, float]]]:
    """Layer knob → level → (share bought, damage guessed at the allowed loss: unknown until
    built) for the ``FACTORIZED_LAYERS`` layers holding most of what the budgets buy (a
    classifier head holds a fifth of MobileNetV3's weights and under 1% of its MACs).
    Factorizing a share of a layer's MACs removes that share of its weights too; a MatMul of
    two activations (attention) has none to factor."""
    rows = [row for row in layer_table(model.graph) if row["op"] in FACTORIZABLE and row["macs"] and row["params"]]
    totals = {kind: sum(row[kind] for row in rows) or 1 for kind in buys}
    shares = {row["name"]: sum(row[kind] / totals[kind] for kind in buys) for row in rows}
    largest = sorted(shares, key=lambda name: (-shares[name], name))[:FACTORIZED_LAYERS]
    return {f"factorize:{name}": {level: (level * shares[name], allowed_loss * level) for level in (0.0, *FACTORIZE_LEVELS)}
            for name in largest}


def _removable(model: ir.Model) -> dict[str, Callable[[float], int]]:
    """Group (by its first layer) → channels a rate removes as the build rounds them (to
    multiples of 8 by default): a level removing nothing, or what the level below removes, is no knob."""
    round_to = ChannelPruningOptions(rate=0.0).round_to
    return {g.names()[0]: functools.partial(g.removable, round_to=round_to) for g in channel_groups(ChannelGraph(model.graph)) if g.classes}


def _mac_layers(model: ir.Model) -> list[str]:
    return [row["name"] for row in layer_table(model.graph) if row["macs"]]


def _first_layer(model: ir.Model) -> str | None:
    """The first MAC layer: it sees raw inputs, the classic int8-sensitive layer."""
    return next(iter(_mac_layers(model)), None)


def _last_layer(model: ir.Model) -> str | None:
    """The last MAC layer (a classifier's logits), the other one."""
    return next(reversed(_mac_layers(model)), None)


def recipe_steps(settings: Mapping[str, Any], finetune: Mapping[str, Any] | None) -> list[Step]:
    """The compression steps of ``settings``: pruning (per-group rates), then factorization
    (one step per level, naming its layers), then fine-tuning with ``finetune``'s options."""
    steps = []
    if settings.get("uniform_prune"):  # the baseline: one rate everywhere, as many MACs as a chosen point
        steps.append(Step("prune", {"mac_reduction": settings["uniform_prune"]}))
    if settings["prune"]:
        steps.append(Step("prune", {"rates": {glob.escape(name): rate for name, rate in sorted(settings["prune"].items())}}))
    for level in sorted(set(settings["factorize"].values())):
        names = sorted(glob.escape(n) for n, v in settings["factorize"].items() if v == level)
        steps.append(Step("factorize", {"layer_reduction": level, "include": names}))
    if settings["finetune"] and finetune:
        steps.append(Step("finetune", dict(finetune)))
    return steps


def describe(settings: Mapping[str, Any]) -> str:
    """One line for progress and errors: ``int8, prune 3 groups, factorize 1 layer``."""
    parts = [settings["precision"]]
    if settings.get("uniform_prune"):
        parts.append(f"uniform prune {settings['uniform_prune']:.0%} of MACs")
    if settings["prune"]:
        parts.append(f"prune {len(settings['prune'])} group{'s' * (len(settings['prune']) > 1)}")
    if settings["factorize"]:
        parts.append(f"factorize {len(settings['factorize'])} layer{'s' * (len(settings['factorize']) > 1)}")
    if settings["keep_float"]:
        parts.append(f"{len(settings['keep_float'])} float")
    if settings["finetune"]:
        parts.append("fine-tuned")
    return ", ".join(parts)
