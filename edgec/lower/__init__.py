"""Lowering: canonical ONNX IR → deployable artifact bytes, one module per backend.

A backend returns its artifacts in memory (file name → bytes); writing them, atomically, is
the build's job. Backends are looked up by the target's ``backend`` field, never by target
name, so a new target for an existing backend is a TOML file and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import onnx_ir as ir

from edgec.analysis import layer_table
from edgec.errors import TargetError
from edgec.lower import ahead
from edgec.passes.quantize import AccuracyGoal, QuantScheme
from edgec.targets import Target
from edgec.verify import InputSet


@dataclasses.dataclass
class Lowered:
    """What a backend produced: named artifact files, which one to verify, and details."""

    files: dict[str, bytes]
    primary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LowerOptions:
    """What a backend needs besides the model and target.

    ``calibration`` holds samples in the source model's layout, keyed by input name
    (the build loads them; backends never touch files). For int8, ``scheme`` is the
    target's quantization scheme with the user's overrides, and ``goal`` what the int8
    model must keep (None: quantize everything the scheme allows). ``ranges`` are activation
    ranges to quantize with instead of calibrated ones, ``(ONNX value name, low, high)``:
    those quantization-aware training learned.
    """

    precision: str = "fp32"
    calibration: InputSet = dataclasses.field(default_factory=lambda: InputSet([], "none"))
    int8_io: bool = False
    scheme: QuantScheme = QuantScheme()
    goal: AccuracyGoal | None = None
    keep_float: tuple[str, ...] = ()
    ranges: tuple[tuple[str, float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Backend:
    module: str
    runtime_options: frozenset[str]
    precisions: frozenset[str]
    # The smallest model (in MACs) whose lowering pays for starting work ahead in a worker
    # process (``background``); None: the backend has no such work.
    ahead_min_macs: int | None = None

    def lower(self, model: ir.Model, target: Target, stem: str, options: LowerOptions) -> Lowered:
        fn: Callable[[ir.Model, Target, str, LowerOptions], Lowered] = importlib.import_module(self.module).lower
        return fn(model, target, stem, options)


# Backend name (as written in targets/*.toml) → module with `lower(model, target, stem, options)`.
BACKENDS = {
    "ort": Backend("edgec.lower.ort", frozenset({"graph_optimization", "formats"}), frozenset({"fp32", "int8"})),
    # TensorFlow's conversion takes seconds on one core; a smaller model's, less than a worker takes to start (importing TensorFlow).
    "tflite": Backend("edgec.lower.tflite", frozenset({"xnnpack"}), frozenset({"fp32", "fp16", "int8"}), 1_000_000_000),
}


def check_precision(target: Target, precision: str) -> None:
    """A TargetError unless ``target``'s backend builds ``precision``."""
    backend = BACKENDS[target.backend]
    if precision not in backend.precisions:
        raise TargetError(
            f"Backend '{target.backend}' (target '{target.name}') cannot build {precision} yet; "
            f"it builds {sorted(backend.precisions)}.",
            hint="Pick another precision, or a target whose backend supports it (see `edgec targets`).",
        )


def lower(model: ir.Model, target: Target, stem: str = "model", options: LowerOptions | None = None) -> Lowered:
    options = options or LowerOptions(precision=target.precision)
    backend = BACKENDS[target.backend]
    unknown = sorted(set(target.runtime) - backend.runtime_options)
    if unknown:
        raise TargetError(
            f"Target '{target.name}' sets runtime options {unknown} that backend '{target.backend}' "
            f"does not know; it accepts {sorted(backend.runtime_options | {'threads'})}."
        )
    check_precision(target, options.precision)
    # Backends rewrite the graph (layout, fusion); the caller's model stays as it was.
    return backend.lower(model.clone(), target, stem, options)


@contextlib.contextmanager
def background(model: ir.Model, target: Target) -> Iterator[None]:
    """Inside, ``lower_ahead`` starts work in a worker process, when ``target``'s backend has
    slow work to start ahead for a model as large as ``model`` (and a second core to do it on)."""
    backend = BACKENDS[target.backend]
    if backend.ahead_min_macs is None or sum(row["macs"] or 0 for row in layer_table(model.graph)) < backend.ahead_min_macs:
        yield
        return
    with ahead.worker(preload=backend.module):
        yield


def lower_ahead(model: ir.Model, target: Target, options: LowerOptions) -> None:
    """Start the slow part of a ``lower(model, target, _, options)`` the caller will make later
    (inside ``background``; otherwise nothing): on two cores, one lowering runs while the
    build does something else. The later ``lower`` gives the same result either way."""
    if ahead.active():
        importlib.import_module(BACKENDS[target.backend].module).convert_ahead(model, target, options)
