"""Latency measurement of artifacts (the device profiler builds on this)."""

from edgec.profile.timing import LatencyStats, measure

__all__ = ["LatencyStats", "measure"]
