"""What every way of running device_runner.py shares: its arguments, reading its answer, and
running it on this machine.

A transport (this machine, an SSH board, qemu) gets the runner and the artifact onto the
device under fixed names, runs ``python device_runner.py model.<suffix> ...`` there and hands
back the runner's JSON; the runner's own failures (runtime missing, timeout, unloadable
artifact) become a ``DeviceError`` that names the device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgec.errors import DeviceError
from edgec.profile import device_runner
from edgec.profile.devices import Device
from edgec.profile.schema import ProfileSettings

RUNNER = Path(device_runner.__file__)
RUNTIME_OF_SUFFIX = device_runner.RUNTIME_OF_SUFFIX
_REASON_OF_RUNNER_ERROR = {"runtime_missing": "runtime_missing", "bad_artifact": "failed"}
_COMMAND_NOT_FOUND = (126, 127)  # the shell could not run the device's python


def staged_name(artifact: Path) -> str:
    """The artifact's name on the device: fixed, so no user file name reaches a command line."""
    return "model" + artifact.suffix.lower()


def runner_arguments(artifact_name: str, settings: ProfileSettings, threads: int) -> list[str]:
    args = [artifact_name, "--warmup", str(settings.warmup), "--runs", str(settings.runs),
            "--threads", str(threads), "--seed", str(settings.seed)]
    if settings.budget_s is not None:
        args += ["--budget-s", repr(settings.budget_s)]
    return args


def stage(artifact: Path, folder: Path) -> None:
    """Put the runner and (a link to) the artifact into ``folder`` under their device names."""
    shutil.copyfile(RUNNER, folder / RUNNER.name)
    os.symlink(artifact.resolve(), folder / staged_name(artifact))


def read_result(device: Device, completed: subprocess.CompletedProcess) -> dict:
    """The runner's JSON result, or a DeviceError saying what went wrong on ``device``."""
    if completed.returncode in _COMMAND_NOT_FOUND:
        raise DeviceError(
            f"Device '{device.name}' has no Python at '{python_of(device)}': {_tail(completed.stderr)}",
            reason="runtime_missing",
            hint="Install python3 on the device, or set `python` in its devices.toml entry to its path.",
        )
    try:
        result = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DeviceError(
            f"The profile on device '{device.name}' failed (exit status {completed.returncode}) "
            f"without a result: {_tail(completed.stderr)}", reason="failed") from None
    if result.get("error") == "timeout":
        raise timeout_error(device)
    if "error" in result:
        raise DeviceError(f"Device '{device.name}': {result['message']}.",
                          reason=_REASON_OF_RUNNER_ERROR.get(result["error"], "failed"))
    return result


def timeout_error(device: Device) -> DeviceError:
    return DeviceError(
        f"Profiling on device '{device.name}' took longer than its timeout_s ({device.timeout_s:g} s) "
        "and was stopped.",
        reason="timeout",
        hint="Profile with fewer --runs or a --budget-s, or raise timeout_s in the device's entry.",
    )


def python_of(device: Device) -> str:
    return device.python or {"local": sys.executable, "ssh": "python3"}.get(device.kind, "python3")


def run_local(device: Device, artifact: Path, settings: ProfileSettings, threads: int) -> dict:
    """Run the runner with this machine's Python in a child process."""
    with tempfile.TemporaryDirectory(prefix="edgec-profile-") as folder:
        stage(artifact, Path(folder))
        command = [python_of(device), RUNNER.name, *runner_arguments(staged_name(artifact), settings, threads)]
        return read_result(device, run_with_timeout(device, command, cwd=folder))


def run_with_timeout(device: Device, command: list[str], timeout_s: float | None = None,
                     **kwargs) -> subprocess.CompletedProcess:
    """Run ``command`` (an argument list, never a shell line), killed after the device's timeout."""
    timeout_s = device.timeout_s if timeout_s is None else timeout_s
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs)
    except subprocess.TimeoutExpired:
        raise timeout_error(device) from None
    except FileNotFoundError as exc:
        raise DeviceError(f"Cannot run '{command[0]}' for device '{device.name}': {exc.strerror}.",
                          reason="not_set_up") from None


def _tail(text: str, lines: int = 5) -> str:
    return " ".join(text.strip().splitlines()[-lines:]) or "(nothing on stderr)"
