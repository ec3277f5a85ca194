"""Compression recipes: which float-to-float passes run between canonicalization and lowering.

A recipe is data — an ordered list of steps, each a pass family and its options — so the
same compression reads the same from the command line, a file and the Python API::

    --factorize mac_reduction=0.3,method=tucker2        # CLI: one step per option
    [[step]]                                            # recipe.toml
    pass = "factorize"
    mac_reduction = 0.3
    Step("factorize", {"mac_reduction": 0.3})           # API

Each family registers a factory that turns (options, calibration data) into an onnx_ir pass;
:func:`make_passes` is the only place that knows the families, so passes stay unaware of
each other and of where their options came from.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import onnx_ir as ir

from edgec.errors import RecipeError
from edgec.passes.channel_pruning import ChannelPruning, ChannelPruningOptions
from edgec.passes.equalize import CrossLayerEqualization
from edgec.passes.factorize import Factorize, FactorizeOptions
from edgec.passes.sparsify import MagnitudeSparsity, SparsifyOptions
from edgec.verify import InputSet


@dataclasses.dataclass(frozen=True)
class Step:
    """One pass of a recipe: the family's name and its options (validated by the family)."""

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **self.options}


# A family's factory: options (already parsed from TOML or key=value text) and a function
# giving calibration samples (real, or seeded random with a warning; loaded only if called,
# so data-free steps never warn) → the pass to run.
Calibration = Callable[[], InputSet]
StepFactory = Callable[[Mapping[str, Any], Calibration], ir.passes.PassBase]

Options = TypeVar("Options")


def options_from(cls: type[Options], options: Mapping[str, Any], step: str) -> Options:
    """Build the dataclass ``cls`` from recipe options, naming unknown keys and bad values."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RecipeError(
            f"Step '{step}' has no option(s) {', '.join(unknown)}.",
            hint=f"Its options are: {', '.join(sorted(known))}.",
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"Step '{step}': {exc}") from None


@dataclasses.dataclass(frozen=True)
class _EqualizeOptions:
    relu6_to_relu: bool = False
    max_iterations: int = 20


def _equalize(options: Mapping[str, Any], calibration: Calibration) -> ir.passes.PassBase:
    settings = options_from(_EqualizeOptions, options, "equalize")
    return CrossLayerEqualization(settings.relu6_to_relu, settings.max_iterations)


def _factorize(options: Mapping[str, Any], calibration: Calibration) -> ir.passes.PassBase:
    settings = options_from(FactorizeOptions, options, "factorize")
    return Factorize(settings, calibration().batches[: settings.samples] if settings.data_aware else None)


def _prune(options: Mapping[str, Any], calibration: Calibration) -> ir.passes.PassBase:
    settings = options_from(ChannelPruningOptions, options, "prune")
    return ChannelPruning(settings, calibration().batches if settings.needs_data else (), "prune")


def _sparsify(options: Mapping[str, Any], calibration: Calibration) -> ir.passes.PassBase:
    settings = options_from(SparsifyOptions, options, "sparsify")
    return MagnitudeSparsity(settings, calibration().batches if settings.measure else (), "sparsify")


FAMILIES: dict[str, StepFactory] = {
    "equalize": _equalize,
    "factorize": _factorize,
    "prune": _prune,
    "sparsify": _sparsify,
}
# Training steps need more of the build than calibration data: the source model to distill
# from, the seed, how image folders become tensors (``edgec.train.TrainingContext``).
def _finetune(options: Mapping[str, Any], training: Any) -> ir.passes.PassBase:
    from edgec.train.finetune import finetune_pass  # TensorFlow: imported only when a build trains

    return finetune_pass(options, training)


TRAINING_FAMILIES: dict[str, Callable[[Mapping[str, Any], Any], ir.passes.PassBase]] = {"finetune": _finetune}


# Options a gate-training step takes from the finetune step after its prune step: how the
# data is read and batched; the rest (epochs, what is constrained) is the gates' own.
GATE_STEP_OPTIONS = ("data", "lr", "batch_size", "schedule", "warmup", "validation", "temperature", "distill_weight", "mix", "augment",
                     "seed")


def with_gate_training(steps: Sequence[Step]) -> list[Step]:
    """``steps`` with a gate-training finetune step before each ``prune`` step of
    ``importance = "gates"`` (channel importance learned on training data, see
    ``edgec.train.gates``): it reads the data of the first finetune step after the prune
    step, which fine-tunes what pruning leaves. Such a prune step ranks globally unless
    it names a ``scope``: the gates start equal, so channels of different layers compare."""
    expanded = []
    for index, step in enumerate(steps):
        if step.name == "prune" and step.options.get("importance") == "gates":
            expanded.append(_gate_step(step, steps[index + 1:]))
            step = Step(step.name, {"scope": "global", **step.options})
        expanded.append(step)
    return expanded


def _gate_step(prune: Step, later: Sequence[Step]) -> Step:
    finetune = next((s for s in later if s.name == "finetune" and "data" in s.options), None)
    if finetune is None:
        raise RecipeError("Pruning with importance = \"gates\" learns which channels matter by training, and no "
                          "finetune step after it gives training data.",
                          hint="Add --finetune DATA (or a finetune step after the prune step), or use importance = \"l2\".")
    settings = options_from(ChannelPruningOptions, prune.options, prune.name)
    inherited = {k: v for k, v in finetune.options.items() if k in GATE_STEP_OPTIONS}
    return Step("finetune", inherited | {"gates": settings.gate_penalty, "epochs": settings.gate_epochs,
                                         "patience": settings.gate_epochs})


def make_passes(steps: Sequence[Step], calibration: Calibration, training: Any = None) -> list[ir.passes.PassBase]:
    """The passes of ``steps``, in order; unknown families are an error that lists the known.
    ``training`` (an ``edgec.train.TrainingContext``) is what training steps are built with."""
    passes = []
    for step in with_gate_training(steps):
        factory = FAMILIES.get(step.name)
        if step.name in TRAINING_FAMILIES:
            if training is None:
                raise RecipeError(f"Step '{step.name}' trains the model, which only a build does.",
                                  hint="Use it in `edgec build` (--recipe or --finetune).")
            passes.append(TRAINING_FAMILIES[step.name](step.options, training))
            continue
        if factory is None:
            raise RecipeError(
                f"Unknown compression step '{step.name}'.",
                hint=f"Known steps: {', '.join(sorted(FAMILIES | TRAINING_FAMILIES))}.",
            )
        passes.append(factory(step.options, calibration))
    return passes


def check_training_steps(steps: Sequence[Step]) -> None:
    """Training steps' options, checked where they are given (before any work); the other
    families check theirs when their passes are made."""
    from edgec.train import FinetuneOptions

    steps = with_gate_training(steps)
    for i, step in enumerate(steps):
        if step.name == "finetune" and options_from(FinetuneOptions, step.options, step.name).qat and i < len(steps) - 1:
            raise RecipeError("A finetune step with qat = true must be the recipe's last step: the activation ranges it "
                              "learns hold for the model it trained, which a later step would change.",
                              hint="Move the QAT step to the end of the recipe.")


def quantization_aware(steps: Sequence[Step]) -> bool:
    """Whether a recipe trains for int8 (a finetune step with ``qat = true``)."""
    return any(step.name == "finetune" and step.options.get("qat") is True for step in steps)


def trains(steps: Sequence[Step]) -> bool:
    """Whether a recipe trains the model (its ONNX is then saved as fine-tuned, not compressed)."""
    return any(step.name in TRAINING_FAMILIES for step in with_gate_training(steps))


def _top_level_pairs(text: str) -> list[str]:
    """Split at commas outside quotes, [lists] and {tables}: "a=1,b=[2,3],c={x=1,y=2}" → 3."""
    pairs, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            pairs.append(text[start:i])
            start = i + 1
    return [*pairs, text[start:]]


def parse_step(name: str, text: str) -> Step:
    """``parse_step("prune", "rate=0.3,exclude=['fc']")`` → ``Step("prune", {...})``.

    Values are TOML literals (numbers, booleans, quoted strings, [lists]); a bare word that
    is not one is taken as a string, so ``method=svd`` works without quotes.
    """
    options: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in _top_level_pairs(text.strip()))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--{name} '{text}': '{pair}' is not of the form key=value.",
                              hint=f"Example: --{name} key=value,other=1.5")
        options[key.strip()] = _literal(raw.strip())
    return Step(name, options)


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def load_recipe(path: str | Path) -> list[Step]:
    """Steps from a TOML file of ``[[step]]`` tables, each with ``pass = "<family>"``. A
    recipe that fixes only build settings (``[build]``, e.g. int8 alone) may have none."""
    data = _read_recipe(path)
    steps = data.get("step", [] if "build" in data else None)
    if not isinstance(steps, list) or not (steps or "build" in data) or not all(isinstance(s, dict) for s in steps):
        raise RecipeError(f"Recipe '{path}' has no [[step]] tables.",
                          hint='Write one [[step]] table per pass, each with pass = "<name>".')
    return [_step_from_table(table, Path(path), i) for i, table in enumerate(steps, 1)]


def _read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"Cannot read recipe '{path}': {exc.strerror}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"Recipe '{path}' is not valid TOML: {exc}.") from None


# Build options a recipe's ``[build]`` table may fix (BuildOptions field → accepted types),
# so that one file reproduces an artifact: ``edgec optimize`` writes the precision, the
# calibration data and the int8 choices of the candidate it chose there.
BUILD_SETTINGS: dict[str, tuple[type, ...]] = {
    "precision": (str,), "calib": (str,), "calib_samples": (int,), "calib_method": (str,), "max_drop": (float, int),
    "min_cosine": (float, int), "tolerance": (float, int), "keep_float": (list,), "speed_check": (bool,), "seed": (int,),
    "int8_io": (bool,), "equalize": (bool,), "equalize_activations": (bool,), "bias_correction": (bool,), "adaround": (bool,),
}


def load_build_settings(path: str | Path) -> dict[str, Any]:
    """The ``[build]`` table of a recipe file ({} without one), its keys and value types checked."""
    table = _read_recipe(path).get("build", {})
    if not isinstance(table, dict):
        raise RecipeError(f"Recipe '{path}': build must be a table ([build]).")
    for key, value in table.items():
        types = BUILD_SETTINGS.get(key)
        if types is None:
            raise RecipeError(f"Recipe '{path}': [build] has no setting '{key}'.", hint=f"Its settings are: {', '.join(sorted(BUILD_SETTINGS))}.")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RecipeError(f"Recipe '{path}': [build] {key} = {value!r} should be of type {types[0].__name__}.")
    return {key: tuple(value) if isinstance(value, list) else value for key, value in table.items()}


Settings = TypeVar("Settings")


def with_build_settings(options: Settings, settings: Mapping[str, Any]) -> Settings:
    """``options`` (a BuildOptions) with a recipe's ``[build]`` settings wherever the caller
    left the default: a flag given on the command line wins over the file."""
    defaults = type(options)()
    return dataclasses.replace(options, **{k: v for k, v in settings.items() if getattr(options, k) == getattr(defaults, k)})


def recipe_toml(steps: Sequence[Step], build: Mapping[str, Any]) -> str:
    """The TOML text of a recipe: ``[build]`` settings, then one ``[[step]]`` table per step
    (the inverse of :func:`load_recipe` and :func:`load_build_settings`)."""
    tables = [("[build]", build)] if build else []
    tables += [("[[step]]", step.to_dict()) for step in steps]
    return "\n".join(f"{header}\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in values.items())
                     for header, values in tables)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    """A TOML literal: JSON's spelling is TOML's for strings, numbers, booleans and arrays;
    tables become inline tables."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _step_from_table(table: dict[str, Any], path: Path, index: int) -> Step:
    options = dict(table)
    name = options.pop("pass", None)
    if not isinstance(name, str):
        raise RecipeError(f"Recipe '{path}', step {index}: missing pass = \"<name>\".",
                          hint=f"Known steps: {', '.join(sorted(FAMILIES))}.")
    return Step(name, options)
