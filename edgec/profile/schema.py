"""What a latency profile is: the settings it is taken with and the JSON it produces.

Every way of profiling (in this process, on an SSH board, on an emulated arm64 core) returns
one *measurement* of the same shape, so reports and comparisons never care where it came from::

    {
      "schema": "edgec.profile/1",
      "artifact": {"file": "model.tflite", "size_bytes": 123, "sha256": "..."},
      "device": {"name": "local", "kind": "local" | "ssh" | "emulated", "arch": "x86_64",
                 "cpu": "cortex-a76" | null, "emulated": false},
      "runtime": {"name": "onnxruntime" | "litert", "version": "1.23.0", "threads": 2},
      "load_ms": 12.3,                       # model load + session/interpreter init
      "latency_ms": {"warmup": 10, "runs": 50, "min": .., "median": .., "mean": ..,
                     "p90": .., "p99": .., "std": ..},
      "peak_memory_mb": 85.1,                # peak resident set of the measuring process
      "ops": null | {...},                   # per-op breakdown, where the runtime can give one
      "cost": null | {...},                  # deterministic cost (instruction counts) on emulators
      "predicted": null | {"metric": "ms" | "instructions", "value": .., "error": ..}
                                             # `edgec profile`: the device's predictor beside it
    }

Wall times on an emulated device are kept (``device.emulated`` is true) but are not latency
of any real board; ``cost`` is what compares variants there.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from edgec.checks import above, at_least, option

SCHEMA = "edgec.profile/1"


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    """How to time an artifact: ``runs`` timed runs after ``warmup``, or as many as fit in
    ``budget_s`` seconds; ``threads`` None means the device's own default."""

    warmup: int = 10
    runs: int = 50
    budget_s: float | None = None
    threads: int | None = None
    ops: bool = True  # collect a per-op breakdown where the runtime supports it
    seed: int = 0  # random inputs are drawn from this seed

    def __post_init__(self) -> None:
        at_least(option("warmup"), self.warmup, 0)
        at_least(option("runs"), self.runs, 1)
        above(option("budget_s", "--budget-s"), self.budget_s, 0)
        at_least(option("threads"), self.threads, 1)
        at_least(option("seed"), self.seed, 0)


def describe_artifact(path: Path) -> dict[str, Any]:
    """The measurement's ``artifact`` entry: which file, exactly (its hash)."""
    content = path.read_bytes()
    return {"file": path.name, "path": str(path), "size_bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
