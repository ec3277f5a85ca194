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

from edgec.errors import DeviceError
from edgec.profile.local import profile_local
from edgec.profile.schema import SCHEMA, ProfileSettings
from edgec.profile.timing import LatencyStats, compare_latency, measure
from edgec.runtime import artifact_path

__all__ = ["PROFILERS", "SCHEMA", "LatencyStats", "ProfileSettings", "compare_latency", "find_device", "measure", "profile"]


def _local(device: Any, artifact: Path, settings: ProfileSettings) -> dict[str, Any]:
    """This machine; an inventory entry of kind local may name it and set its default threads."""
    if settings.threads is None and getattr(device, "threads", None):
        settings = dataclasses.replace(settings, threads=device.threads)
    return profile_local(artifact, settings, device_name=getattr(device, "name", device))


# Device kind → profiler(device, artifact, settings) → measurement.
PROFILERS: dict[str, Callable[[Any, Path, ProfileSettings], dict[str, Any]]] = {
    "local": _local,
}


def profile(artifact: str | os.PathLike[str], device: Any = "local", settings: ProfileSettings | None = None) -> dict[str, Any]:
    """Measure ``artifact`` on ``device`` (a device name, or an inventory entry with a ``kind``)."""
    path = artifact_path(artifact)
    kind = getattr(device, "kind", device)
    profiler = PROFILERS.get(kind)
    if profiler is None:
        name = getattr(device, "name", device)
        raise DeviceError(
            f"Cannot profile on device '{name}' (kind '{kind}'): this edgec profiles on {', '.join(sorted(PROFILERS))} only.",
            hint="Use --device local.",
        )
    return profiler(device, path, settings or ProfileSettings())


def find_device(name: str, inventory: str | os.PathLike[str] | None = None) -> Any:
    """The device called ``name``: this machine ("local") until a device inventory is wired in."""
    if inventory is not None or name != "local":
        raise DeviceError(f"Unknown device '{name}': this edgec profiles on 'local' only.", hint="Use --device local.")
    return name
