"""Wall-clock latency of a runner: warm-up, then timed runs, summarized.

Numbers from one machine are only comparable within one process and one run: machines
here are noisy, so compare ratios measured side by side, never absolute times across runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgec.profile.device_runner import summary, timed_samples
from edgec.runtime import Runner
from edgec.verify import random_inputs


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    runs: int
    min_ms: float
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    samples_ms: tuple[float, ...] = ()  # every timed run, in order, for distributions

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        s = summary(samples_ms)
        return cls(s["runs"], s["min"], s["median"], s["mean"], s["p90"], s["p99"], s["std"], tuple(s["samples"]))

    def to_dict(self) -> dict:
        """The ``latency_ms`` entry of a profile measurement (edgec/profile/schema.py)."""
        return {"runs": self.runs, "min": self.min_ms, "median": self.median_ms, "mean": self.mean_ms,
                "p90": self.p90_ms, "p99": self.p99_ms, "std": self.std_ms, "samples": list(self.samples_ms)}


def measure(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int = 10, runs: int = 50,
            budget_s: float | None = None) -> LatencyStats:
    """Time ``runs`` invocations (or as many as fit in ``budget_s``) after ``warmup`` ones."""
    for _ in range(warmup):
        runner.run(feeds)
    return LatencyStats.from_samples(timed_samples(runner, feeds, runs, budget_s))


def compare_latency(runners: dict[str, Runner | Callable[[], Runner]], runs: int, rounds: int = 5,
                    budget_s: float | None = None, warmup: int = 10, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Latency per runner over ``rounds`` alternating rounds of ``runs`` timed runs each (or as
    many as fit in ``budget_s`` per runner and round, at least 3), after ``warmup`` runs each round.

    ``best_median_ms`` (the lowest round median) is what ratios use: on a shared, noisy
    machine, interference only ever adds time, so the quietest round is the truest one.
    Each runner gets ``feeds`` when given (edgec's artifacts all take the source's names and
    layout; a build times on its own data, since random integers can divide by 0), else
    seeded random data shaped for its own inputs (a foreign .tflite has its own input names
    and layout). Where a factory is given instead of a runner, every round
    times a new instance: where a runtime puts one instance's buffers in memory moved
    LiteRT's latency by up to 8% here between two instances of the same file, a difference
    that repeating rounds on the same instances never averages out.
    """
    made = {name: r if isinstance(r, Runner) else r() for name, r in runners.items()}
    given = feeds
    feeds = {name: dict(given) if given is not None else random_inputs(r.inputs, count=1).batches[0] for name, r in made.items()}
    medians: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(rounds):
        for name, runner in runners.items():
            instance = made[name] if isinstance(runner, Runner) or round_index == 0 else runner()
            medians[name].append(measure(instance, feeds[name], warmup, runs, budget_s).median_ms)
    return {name: {"best_median_ms": min(m), "round_medians_ms": m} for name, m in medians.items()}
