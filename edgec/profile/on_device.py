"""Profile an artifact on a device of the inventory: this machine, an SSH board or an
emulated arm64 core, all through the same runner and into the same measurement shape
(edgec/profile/schema.py)."""

from __future__ import annotations

import os
from pathlib import Path

from edgec.errors import DeviceError, ModelLoadError
from edgec.profile.devices import Device
from edgec.profile.emulator import run_emulated
from edgec.profile.schema import SCHEMA, ProfileSettings, describe_artifact
from edgec.profile.ssh import run_ssh
from edgec.profile.transport import RUNTIME_OF_SUFFIX, run_local

TRANSPORTS = {"local": run_local, "ssh": run_ssh, "emulated": run_emulated}
_NO_OPS = "the device runner takes no per-op breakdown; profile on the local device for one"
# The measurement's keys the device runner fills in, in the measurement's order.
_FROM_RUNNER = ("runtime", "load_ms", "first_run_ms", "latency_ms", "peak_memory_mb", "memory")


def profile_on_device(device: Device, artifact_path: str | os.PathLike[str], settings: ProfileSettings) -> dict:
    """The measurement of ``artifact_path`` on ``device`` (``schema.SCHEMA``)."""
    artifact = _checked_artifact(device, Path(artifact_path))
    threads = device.threads if settings.threads is None else settings.threads
    result = TRANSPORTS[device.kind](device, artifact, settings, threads)
    cpu = device.emulation.cpu if device.emulation else result["cpu"]
    return {
        "schema": SCHEMA,
        "artifact": describe_artifact(artifact),
        "device": {**device.summary(), "arch": result["arch"], "cpu": cpu},
        **{key: result[key] for key in _FROM_RUNNER},
        "ops": {"unavailable": _NO_OPS} if settings.ops else None,
        "cost": result.get("cost"),
    }


def _checked_artifact(device: Device, artifact: Path) -> Path:
    if not artifact.is_file():
        raise ModelLoadError(f"Artifact '{artifact}' does not exist.",
                             hint="Give the path of a .tflite, .onnx or .ort file that `edgec build` wrote.")
    runtime = RUNTIME_OF_SUFFIX.get(artifact.suffix.lower())
    if runtime is None:
        raise ModelLoadError(f"Artifact '{artifact}' is not a model file edgec can profile.",
                             hint=f"Profile a {', '.join(RUNTIME_OF_SUFFIX)} file.")
    if runtime not in device.runtimes:
        raise DeviceError(f"Device '{device.name}' has no {runtime} runtime (it has {', '.join(device.runtimes)}).",
                          reason="config",
                          hint="Profile an artifact built for one of those runtimes, or add it to the device's "
                               "`runtimes` once it is installed there.")
    return artifact
