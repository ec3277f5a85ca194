"""Profile an artifact in this process, on this machine (device kind "local").

Like TFLite's benchmark_model: model load + initialization (not the import of the runtime's
Python module) is timed apart from inference,
the first inference apart from the steady state, then warm-up and timed runs; the per-op
breakdown (edgec/profile/ops.py) runs afterwards in a second session, so its profiler's
overhead never reaches the end-to-end numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import resource
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from edgec.profile.ops import operator_breakdown
from edgec.profile.schema import SCHEMA, ProfileSettings
from edgec.profile.timing import measure
from edgec.runtime import Runner, import_runtime, open_runner
from edgec.verify import random_inputs

# Runner.runtime → the distribution whose version the measurement records.
_DISTRIBUTIONS = {"onnxruntime": "onnxruntime", "litert": "ai-edge-litert"}
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


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
            start = time.perf_counter()
            runner.run(feeds)
            first_ms = (time.perf_counter() - start) * 1e3
            stats = measure(runner, feeds, warmup=max(settings.warmup - 1, 0), runs=settings.runs, budget_s=settings.budget_s)
        ops = operator_breakdown(path, threads, feeds, stats.median_ms, runs=stats.runs) if settings.ops else None
    latency = {"warmup": settings.warmup, **stats.to_dict()}
    if settings.budget_s is not None:
        latency["budget_s"] = settings.budget_s
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


def describe_artifact(path: Path) -> dict[str, Any]:
    content = path.read_bytes()
    return {"file": path.name, "path": str(path), "size_bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def local_device(name: str = "local") -> dict[str, Any]:
    return {"name": name, "kind": "local", "arch": platform.machine(), "cpu": _cpu_model(), "emulated": False}


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _runtime(runner: Runner, threads: int) -> dict[str, Any]:
    return {"name": runner.runtime, "version": metadata.version(_DISTRIBUTIONS[runner.runtime]), "threads": threads}


@contextlib.contextmanager
def pinned(threads: int) -> Iterator[list[int] | None]:
    """Pin this thread (and the runtime threads it starts) to ``threads`` CPUs, so timings do
    not migrate between cores; yields the CPUs, or None where the OS cannot pin or there are
    no more CPUs allowed than threads asked (pinning would change nothing)."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    allowed = sorted(os.sched_getaffinity(0))
    if threads >= len(allowed):
        yield None
        return
    chosen = allowed[:threads]
    os.sched_setaffinity(0, chosen)
    try:
        yield chosen
    finally:
        os.sched_setaffinity(0, allowed)


class PeakMemory:
    """Peak resident set size of this process while the block runs.

    Linux keeps a high-water mark (VmHWM) that writing "5" to /proc/self/clear_refs resets,
    so the peak covers this model's load and runs, not earlier imports; where that is not
    possible the lifetime peak (getrusage ru_maxrss) is reported and the method says so.
    """

    def __enter__(self) -> Self:
        self.baseline_mb = _status_mb("VmRSS")
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "VmHWM of /proc/self/status, reset via /proc/self/clear_refs before loading"
        except OSError:
            self.method = "getrusage ru_maxrss: peak of the whole process lifetime"
        return self

    def __exit__(self, *exc) -> None:
        if self.method.startswith("VmHWM"):
            self.peak_mb = _status_mb("VmHWM")
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_mb": self.peak_mb, "rss_before_load_mb": self.baseline_mb, "method": self.method}


def _status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None
