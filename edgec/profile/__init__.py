"""Latency measurement of artifacts (the device profiler builds on this)."""

from edgec.profile.timing import LatencyStats, compare_latency, measure

__all__ = ["LatencyStats", "compare_latency", "measure"]
