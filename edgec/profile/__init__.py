"""Latency profiling of artifacts: here (local) or, through transports, on other devices.

``profile(artifact, device, settings)`` returns one measurement (edgec/profile/schema.py)
whatever the device; ``PROFILERS`` maps a device kind to the function that measures there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgec.profile.devices import Device, get_device, load_devices
from edgec.profile.local import profile_local
from edgec.profile.on_device import profile_on_device
from edgec.profile.schema import SCHEMA, ProfileSettings
from edgec.profile.timing import LatencyStats, compare_latency, measure
from edgec.runtime import artifact_path

__all__ = ["PROFILERS", "SCHEMA", "Device", "LatencyStats", "ProfileSettings", "compare_latency", "get_device",
           "load_devices", "measure", "profile"]


def _local(device: Device, artifact: Path, settings: ProfileSettings) -> dict[str, Any]:
    """This machine, in this process (which also gives the per-op breakdown)."""
    if settings.threads is None:
        settings = dataclasses.replace(settings, threads=device.threads)
    return profile_local(artifact, settings, device_name=device.name)


# Device kind → profiler(device, artifact, settings) → measurement.
PROFILERS: dict[str, Callable[[Device, Path, ProfileSettings], dict[str, Any]]] = {
    "local": _local,
    "ssh": profile_on_device,
    "emulated": profile_on_device,
}


def profile(artifact: str | os.PathLike[str], device: Device | str = "local",
            settings: ProfileSettings | None = None) -> dict[str, Any]:
    """Measure ``artifact`` on ``device`` (an inventory entry, or the name of one in targets/devices.toml)."""
    device = get_device(device) if isinstance(device, str) else device
    return PROFILERS[device.kind](device, artifact_path(artifact), settings or ProfileSettings())
