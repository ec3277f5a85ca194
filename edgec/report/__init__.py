"""Reports: the JSON every build writes (schema in README.md, "report.json")."""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

# The packages whose versions decide what an artifact contains and how it runs.
_VERSIONED = ("onnx", "onnx-ir", "onnxscript", "onnxruntime", "tensorflow", "tf-keras", "ai-edge-litert", "numpy")


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_json(data: dict[str, Any]) -> bytes:
    """Stable, human-readable JSON (same data → same bytes)."""
    return (json.dumps(data, indent=2, allow_nan=True) + "\n").encode()
