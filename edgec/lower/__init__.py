"""Lowering: canonical ONNX IR → deployable artifact bytes, one module per backend.

A backend returns its artifacts in memory (file name → bytes); writing them, atomically, is
the build's job. Backends are looked up by the target's ``backend`` field, never by target
name, so a new target for an existing backend is a TOML file and nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import onnx_ir as ir

from edgec.errors import TargetError
from edgec.targets import Target


@dataclasses.dataclass
class Lowered:
    """What a backend produced: named artifact files, which one to verify, and details."""

    files: dict[str, bytes]
    primary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Backend:
    module: str
    runtime_options: frozenset[str]

    def lower(self, model: ir.Model, target: Target, stem: str) -> Lowered:
        fn: Callable[[ir.Model, Target, str], Lowered] = importlib.import_module(self.module).lower
        return fn(model, target, stem)


# Backend name (as written in targets/*.toml) → module with `lower(model, target, stem)`.
BACKENDS = {
    "ort": Backend("edgec.lower.ort", frozenset({"graph_optimization", "formats"})),
    "tflite": Backend("edgec.lower.tflite", frozenset({"xnnpack"})),
}


def lower(model: ir.Model, target: Target, stem: str = "model") -> Lowered:
    backend = BACKENDS[target.backend]
    unknown = sorted(set(target.runtime) - backend.runtime_options)
    if unknown:
        raise TargetError(
            f"Target '{target.name}' sets runtime options {unknown} that backend '{target.backend}' "
            f"does not know; it accepts {sorted(backend.runtime_options | {'threads'})}."
        )
    # Backends rewrite the graph (layout, fusion); the caller's model stays as it was.
    return backend.lower(model.clone(), target, stem)
