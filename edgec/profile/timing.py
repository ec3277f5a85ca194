"""Wall-clock latency of a runner: warm-up, then timed runs, summarized.

Numbers from one machine are only comparable within one process and one run: machines
here are noisy, so compare ratios measured side by side, never absolute times across runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import numpy as np

from edgec.runtime import Runner


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    runs: int
    min_ms: float
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int = 10, runs: int = 50,
            budget_s: float | None = None) -> LatencyStats:
    """Time ``runs`` invocations (or as many as fit in ``budget_s``) after ``warmup`` ones."""
    for _ in range(warmup):
        runner.run(feeds)
    times = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while len(times) < runs and (deadline is None or time.perf_counter() < deadline or len(times) < 3):
        start = time.perf_counter()
        runner.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    t = np.array(times)
    return LatencyStats(len(t), float(t.min()), float(np.median(t)), float(t.mean()),
                        float(np.percentile(t, 90)), float(np.percentile(t, 99)), float(t.std()))
