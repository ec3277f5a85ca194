"""Uniform runners: one interface to run an artifact with numpy inputs, whatever the runtime."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from edgec.errors import ModelLoadError
from edgec.runtime.base import Runner, TensorSpec

__all__ = ["Runner", "TensorSpec", "artifact_path", "compare_threads", "import_runtime", "open_runner", "RUNNERS"]


def _ort(path: Path, threads: int, options: dict) -> Runner:
    from edgec.runtime.ort import OrtRunner

    return OrtRunner(path, threads=threads, optimization=options.get("graph_optimization", "all"))


def _litert(path: Path, threads: int, options: dict) -> Runner:
    from edgec.runtime.litert import LiteRTRunner

    return LiteRTRunner(path, threads=threads, xnnpack=options.get("xnnpack", True))


# File suffix → runner factory. Imports are deferred: each runtime is heavy to import.
RUNNERS = {".onnx": _ort, ".ort": _ort, ".tflite": _litert}
_MODULES = {_ort: "edgec.runtime.ort", _litert: "edgec.runtime.litert"}


# Threads for runs whose outputs (not timings) are compared. LiteRT's kernels (XNNPACK,
# ruy) split work by output tiles, never inside a sum, so their outputs do not depend on the
# thread count (bitwise equal at 1 and 2 threads on every zoo artifact, fp32 and int8): every
# core may help, up to a few. ORT's were not shown to be, so its comparisons stay at one.
_COMPARE_THREADS = {".tflite": min(os.cpu_count() or 1, 4)}


def compare_threads(suffix: str) -> int:
    """How many threads a run whose outputs are compared may use, for artifacts of this file suffix."""
    return _COMPARE_THREADS.get(suffix, 1)


def import_runtime(path: str | os.PathLike[str]) -> None:
    """Import the runtime ``path`` needs now, so a timed model load does not include it."""
    importlib.import_module(_MODULES[RUNNERS[artifact_path(path).suffix]])


def artifact_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a file some runner handles; a ModelLoadError saying why not otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"No such artifact: '{path}'.", hint="Check the path.")
    if path.suffix not in RUNNERS:
        raise ModelLoadError(
            f"'{path.name}' has suffix '{path.suffix}', which no runner handles.",
            hint=f"edgec runs {', '.join(sorted(RUNNERS))} files.",
        )
    return path


def open_runner(path: str | os.PathLike[str], threads: int = 1, options: dict | None = None) -> Runner:
    """Open an artifact with the runner its file type calls for."""
    path = artifact_path(path)
    return RUNNERS[path.suffix](path, threads, options or {})
