"""What a candidate costs on the user's device, measured once per artifact.

* an emulated core: instructions per inference (deterministic; wall time under emulation
  is not latency), as the build's speed check counts them;
* this machine (``local``): latency of the candidate and the fp32 reference in alternating
  rounds in this process, best round median each (noise only adds time), so the ratio
  holds on a busy machine; each round opens both anew (``local_latency``);
* an SSH board: the best median of a few profiling rounds, the reference the same way;
* with ``--cost predicted``, any of them from its fitted latency predictor (``predicted``).

Measurements are kept in JSON files keyed by device and artifact sha256 (and, for
``local``, the reference's), so a resumed or repeated search never measures an artifact twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgec.profile import Device, ProfileSettings, compare_latency, profile
from edgec.runtime import open_runner

EMULATED = ProfileSettings(warmup=0, runs=1, ops=False)  # the build's speed check counts the same way
BOARD, BOARD_ROUNDS = ProfileSettings(warmup=3, runs=20, ops=False), 3
LOCAL_RUNS, LOCAL_ROUNDS, LOCAL_BUDGET_S, LOCAL_WARMUP = 20, 5, 0.5, 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CostCache:
    """Measured costs in folder ``path``, one small JSON file per key, each written atomically:
    candidates measured at once in other processes (edgec.executors) never overwrite each other."""

    def __init__(self, path: Path):
        self.path = path

    def get(self, key: str) -> Any:
        file = self._file(key)
        return json.loads(file.read_text()) if file.is_file() else None

    def put(self, key: str, value: Any) -> Any:
        write_atomically(self._file(key), json.dumps(value, sort_keys=True).encode())
        return value

    def _file(self, key: str) -> Path:
        return self.path / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, never half of it (an interrupted search resumes from these files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(staging, path)


def measure(artifact: Path, reference: Path | None, device: Device, runtime: dict[str, Any], threads: int,
            cache: CostCache) -> dict[str, Any]:
    """``{"metric": "instructions"|"ms", "value", "relative"}``: the cost of ``artifact`` on
    ``device`` and its ratio to ``reference`` (the fp32 build; 1.0 when it is the reference)."""
    digest = sha256(artifact)
    ref_digest = sha256(reference) if reference is not None else digest
    if device.kind == "local":
        key = f"local/{digest}/{ref_digest}"
        against = reference if ref_digest != digest else None  # the reference itself: 1.0, not two timings' noise
        return cache.get(key) or cache.put(key, local_latency(artifact, against, runtime, threads))
    value = _absolute(artifact, device, digest, cache)
    base = value if reference is None or ref_digest == digest else _absolute(reference, device, ref_digest, cache)
    return {"metric": "instructions" if device.emulated else "ms", "value": value, "relative": round(value / base, 6)}


def predicted(artifact: Path, reference: Path | None, device: Device) -> dict[str, Any]:
    """``measure``'s answer from the device's fitted latency predictor (edgec.predict) instead
    of the device: milliseconds or instructions, deterministic, in a fraction of a second."""
    from edgec.predict import predict_cost

    value = predict_cost(artifact, device)
    base = value if reference is None else predict_cost(reference, device)
    return {"metric": "instructions" if device.emulated else "ms", "value": round(value, 5), "relative": round(value / base, 6),
            "predicted": True}


def _absolute(artifact: Path, device: Device, digest: str, cache: CostCache) -> float:
    key = f"{device.name}/{digest}"
    cached = cache.get(key)
    if cached is not None:
        return cached
    if device.emulated:
        return cache.put(key, profile(artifact, device, EMULATED)["cost"]["instructions"])
    return cache.put(key, min(profile(artifact, device, BOARD)["latency_ms"]["median"] for _ in range(BOARD_ROUNDS)))


def local_latency(artifact: Path, reference: Path | None, runtime: dict[str, Any], threads: int,
                  rounds: int = LOCAL_ROUNDS) -> dict[str, Any]:
    """``measure``'s answer on this machine. Every round opens new sessions: one pair of
    sessions can stay in a lucky or unlucky state for all its rounds (ORT with 2 threads on
    this 2-core host: a pruned MobileNetV3's best-round ratio to fp32 ranged 0.53-1.68 over 5
    repeats with one pair each, 0.89-0.96 with new sessions each round, though single
    outliers remain), and a search that picks the cheapest of many candidates would pick the
    lucky ones: the driver times its choices again before choosing."""
    def opener(path: Path):
        return lambda: open_runner(path, threads=threads, options=runtime)

    runners = {"candidate": opener(artifact)}
    if reference is not None:
        runners["reference"] = opener(reference)
    latency = compare_latency(runners, LOCAL_RUNS, rounds, LOCAL_BUDGET_S, LOCAL_WARMUP)
    ms = latency["candidate"]["best_median_ms"]
    relative = ms / latency["reference"]["best_median_ms"] if reference is not None else 1.0
    return {"metric": "ms", "value": round(ms, 5), "relative": round(relative, 6)}
