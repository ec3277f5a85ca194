"""Latency profiling of artifacts: here (local) or, through transports, on other devices.

``profile(artifact, device, settings)`` returns one measurement (edgec/profile/schema.py)
whatever the device; ``PROFILERS`` maps a device kind to the function that measures there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from edgec.targets import same_arch

__all__ = ["PROFILERS", "SCHEMA", "Device", "LatencyStats", "ProfileSettings", "built_for", "compare_latency",
           "foreign_device_warning", "get_device", "load_devices", "measure", "profile"]


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


def foreign_device_warning(artifact: str, target: str, arch: str, device: Device) -> str | None:
    """What to tell a user about to profile an artifact built for ``arch`` on a device of
    another architecture (the numbers then describe that device), or None."""
    if same_arch(device.arch, arch):
        return None
    return (f"Profiling {artifact}, built for {target} ({arch}), on device '{device.name}' ({device.arch}): the numbers "
            f"describe {device.arch}, not the target's hardware. Profile on a device of the target's architecture "
            "(e.g. emulated-a76, or an SSH board in --devices) for numbers that do.")


def built_for(artifact: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The target an edgec build made ``artifact`` for, read from the report.json beside it
    when that report lists this very file (same sha256); None otherwise."""
    path = Path(artifact)
    try:
        report = json.loads((path.parent / "report.json").read_text())
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if any(entry.get("sha256") == digest for entry in report.get("artifacts", [])):
            return report.get("target")
    except (OSError, ValueError, AttributeError, TypeError):  # no report, or not one of edgec's
        return None
    return None
