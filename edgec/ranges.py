"""Activation ranges chosen by the quantization error they cause, not by the extremes seen.

Min/max calibration spends the 256 int8 levels on the largest value any calibration
sample reached; one outlier makes every other value coarser. Here a tensor's values are
summarized by a histogram and the range ``[lo, hi]`` (zero inside, as asymmetric int8
needs) is the one with the smallest expected squared error: ``step² / 12`` for each value
inside (uniform rounding error), ``(x − edge)²`` for each value clipped. Exact zeros, the
bulk of a ReLU's output, cost nothing: zero is always on the grid.
"""

from __future__ import annotations

import numpy as np

BINS = 1024
SHRINK = np.linspace(0.1, 1.0, 46)  # the fractions of each side of the observed range tried


class Histogram:
    """Values seen, in ``BINS`` equal bins over a fixed ``[low, high]`` (the calibrated min/max)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = min(float(low), 0.0), max(float(high), 0.0)
        self.counts = np.zeros(BINS, np.float64)

    def add(self, values: np.ndarray) -> None:
        values = values[values != 0].astype(np.float64, copy=False)
        if self.high > self.low and values.size:
            counts, _ = np.histogram(np.clip(values, self.low, self.high), BINS, (self.low, self.high))
            self.counts += counts

    def merge(self, other: Histogram) -> Histogram:
        """One histogram over both ranges: ``other``'s counts moved to this one's bins by centre."""
        merged = Histogram(min(self.low, other.low), max(self.high, other.high))
        for part in (self, other):
            centres = part.centres()
            merged.counts += np.histogram(centres, BINS, (merged.low, merged.high), weights=part.counts)[0]
        return merged

    def centres(self) -> np.ndarray:
        edges = np.linspace(self.low, self.high, BINS + 1)
        return (edges[:-1] + edges[1:]) / 2

    def best_range(self, levels: int = 256) -> tuple[float, float]:
        """The ``[lo, hi]`` (shrunk from the observed range by the ``SHRINK`` fractions on each
        side) with the least expected squared quantization error over the values seen."""
        if self.counts.sum() == 0 or self.high <= self.low:
            return self.low, self.high
        lows, highs = np.meshgrid(self.low * SHRINK, self.high * SHRINK, indexing="ij")
        lows, highs = lows.reshape(-1, 1), highs.reshape(-1, 1)
        x = self.centres()[None, :]
        step = (highs - lows) / (levels - 1)
        inside = (x >= lows) & (x <= highs)
        error = np.where(inside, step**2 / 12, (x - np.clip(x, lows, highs)) ** 2) @ self.counts
        best = int(np.argmin(error))  # ties: the first, i.e. the narrowest low side, deterministically
        return float(lows[best, 0]), float(highs[best, 0])
