"""Profile an artifact in this process, on this machine (device kind "local").

Like TFLite's benchmark_model: model load + initialization (not the import of the runtime's
Python module) is timed apart from inference,
the first inference apart from the steady state, then warm-up and timed runs; the per-op
breakdown (edgec/profile/ops.py) runs afterwards in a second session, so its profiler's
overhead never reaches the end-to-end numbers.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from edgec.profile.device_runner import PeakMemory, cpu_model, pinned, time_runs
from edgec.profile.ops import operator_breakdown
from edgec.profile.schema import SCHEMA, ProfileSettings, describe_artifact
from edgec.runtime import Runner, import_runtime, open_runner
from edgec.verify import random_inputs

# Runner.runtime → the distribution whose version the measurement records.
_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}


def profile_local(artifact_path: str | os.PathLike[str], settings: ProfileSettings, device_name: str = "local") -> dict[str, Any]:
    """Measure ``artifact_path`` here; returns a measurement of edgec/profile/schema.py's shape."""
    path = Path(artifact_path)
    import_runtime(path)
    threads = settings.threads or len(os.sched_getaffinity(0))
    with pinned(threads) as cpus:
        with PeakMemory() as memory:
            start = time.perf_counter()
            runner = open_runner(path, threads=threads)
            load_ms = (time.perf_counter() - start) * 1e3
            feeds = random_inputs(runner.inputs, seed=settings.seed, count=1).batches[0]
            first_ms, latency = time_runs(runner, feeds, settings.warmup, settings.runs, settings.budget_s)
        ops = operator_breakdown(path, threads, feeds, latency["median"], runs=latency["runs"]) if settings.ops else None
    return {
        "schema": SCHEMA,
        "artifact": describe_artifact(path),
        "device": local_device(device_name),
        "runtime": {**_runtime(runner, threads), "pinned_cpus": cpus},
        "load_ms": load_ms,
        "first_run_ms": first_ms,
        "latency_ms": latency,
        "peak_memory_mb": memory.peak_mb,
        "memory": memory.to_dict(),
        "ops": ops,
        "cost": None,
    }


def local_device(name: str = "local") -> dict[str, Any]:
    return {"name": name, "kind": "local", "arch": platform.machine(), "cpu": cpu_model(), "emulated": False}


def _runtime(runner: Runner, threads: int) -> dict[str, Any]:
    return {"name": runner.runtime, "version": metadata.version(_DISTRIBUTIONS[runner.runtime]), "threads": threads}
