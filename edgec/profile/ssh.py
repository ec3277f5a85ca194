"""Profile on a board over SSH with the system's ``ssh`` and ``scp``.

Per profile: ``mktemp -d`` on the board, copy the runner and the artifact there under fixed
names (``device_runner.py``, ``model.<suffix>``), run the runner with the board's Python and
bring back its JSON, then remove the folder, also after a failure or a timeout.

Safety: commands are argument lists (no local shell), the one remote command line is built
with ``shlex.quote`` from fixed names and numbers, never from the user's file name; the
board's host key must already be known (``StrictHostKeyChecking=yes``), and ssh never asks
for a password (``BatchMode=yes``).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from edgec.errors import DeviceError
from edgec.profile.devices import Device, SshAccess
from edgec.profile.schema import ProfileSettings
from edgec.profile.transport import (
    RUNNER,
    python_of,
    read_result,
    run_with_timeout,
    runner_arguments,
    stage,
    staged_name,
    timeout_error,
)

_CLEANUP_TIMEOUT_S = 30.0
_PID_FILE = "runner.pid"  # the runner's PID on the board (the shell that writes it execs the runner)
_SAFE_REMOTE_DIR = re.compile(r"/[A-Za-z0-9._/-]+")
# ssh's own words for each failure it exits 255 with, checked in this order.
_SSH_FAILURES = (
    ("host_key", ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")),
    ("auth", ("Permission denied", "Too many authentication failures", "no such identity")),
    ("unreachable", ("Connection refused", "Connection timed out", "No route to host", "Could not resolve hostname",
                     "Network is unreachable", "Connection closed", "Connection reset", "timed out")),
)
_WHAT_FAILED = {
    "host_key": "has a host key that known_hosts does not hold",
    "auth": "refused the login",
    "unreachable": "cannot be reached",
    "failed": "failed over ssh",
}
_HINTS = {
    "host_key": "edgec accepts only known host keys. Check the board's fingerprint, then add it: "
                "ssh-keyscan -p PORT HOST >> KNOWN_HOSTS (the known_hosts of the device entry).",
    "auth": "Check user and key in the device entry, and that the key's public half is in the board's "
            "~/.ssh/authorized_keys.",
    "unreachable": "Check that the board is on, its address and port, and that sshd runs on it.",
}
_SSH_EXIT_FAILURE = 255


def run_ssh(device: Device, artifact: Path, settings: ProfileSettings, threads: int) -> dict:
    """The runner's result for ``artifact`` on the SSH board ``device``."""
    access = _checked_access(device)
    deadline = time.monotonic() + device.timeout_s
    remote_dir = _make_remote_dir(device, access, deadline)
    try:
        _copy(device, access, artifact, remote_dir, deadline)
        remaining = _remaining(device, deadline)
        runner = [python_of(device), RUNNER.name, *runner_arguments(staged_name(artifact), settings, threads),
                  # The runner stops itself first where the time left allows; the clean-up kills it otherwise.
                  "--timeout-s", f"{max(remaining - access.connect_timeout_s, 1.0):.0f}"]
        line = f"cd {shlex.quote(remote_dir)} && echo $$ > {_PID_FILE} && exec {shlex.join(runner)}"
        completed = run_with_timeout(device, _ssh_command(access, line), remaining)
        if completed.returncode == _SSH_EXIT_FAILURE:
            _raise_ssh_failure(device, completed)
        return read_result(device, completed)
    finally:
        _remove_remote_dir(access, remote_dir)


def ssh_options(access: SshAccess) -> list[str]:
    """Options shared by ssh and scp (``-o`` only, which both take). Paths are quoted: ssh
    splits ``-o`` values at spaces."""
    options = {
        "BatchMode": "yes", "StrictHostKeyChecking": "yes", "IdentitiesOnly": "yes",
        "IdentityFile": f'"{access.key}"', "User": access.user, "Port": str(access.port),
        "ConnectTimeout": f"{access.connect_timeout_s:.0f}", "ServerAliveInterval": "5",
        "ServerAliveCountMax": "3",
    }
    if access.known_hosts is not None:
        options["UserKnownHostsFile"] = f'"{access.known_hosts}"'
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _ssh_command(access: SshAccess, remote_line: str) -> list[str]:
    return ["ssh", *ssh_options(access), "--", access.host, remote_line]


def _checked_access(device: Device) -> SshAccess:
    access = device.ssh
    if not access.key.is_file():
        raise DeviceError(f"Device '{device.name}': the SSH key '{access.key}' does not exist.", reason="config",
                          hint="Set key in the device entry to the private key that logs in to the board.")
    if access.known_hosts is not None and not access.known_hosts.is_file():
        raise DeviceError(f"Device '{device.name}': the known_hosts file '{access.known_hosts}' does not exist.",
                          reason="config", hint=_HINTS["host_key"])
    return access


def _make_remote_dir(device: Device, access: SshAccess, deadline: float) -> str:
    completed = run_with_timeout(device, _ssh_command(access, "mktemp -d"), _remaining(device, deadline))
    if completed.returncode != 0:
        _raise_ssh_failure(device, completed)
    remote_dir = completed.stdout.strip()
    if not _SAFE_REMOTE_DIR.fullmatch(remote_dir):
        raise DeviceError(f"Device '{device.name}': `mktemp -d` answered {remote_dir!r}, not a folder path.",
                          reason="failed", hint="Check that the board's login shell is quiet and has mktemp.")
    return remote_dir


def _copy(device: Device, access: SshAccess, artifact: Path, remote_dir: str, deadline: float) -> None:
    with tempfile.TemporaryDirectory(prefix="edgec-ssh-") as folder:
        stage(artifact, Path(folder))
        # Absolute local paths: scp reads a name with ':' before any '/' as a host.
        files = [str(Path(folder) / name) for name in (RUNNER.name, staged_name(artifact))]
        host = f"[{access.host}]" if ":" in access.host else access.host
        command = ["scp", "-q", *ssh_options(access), "--", *files, f"{host}:{remote_dir}/"]
        completed = run_with_timeout(device, command, _remaining(device, deadline))
    if completed.returncode != 0:
        _raise_ssh_failure(device, completed)


def _remove_remote_dir(access: SshAccess, remote_dir: str) -> None:
    """Stop the runner if it still runs, then remove the folder. A runner told to stop
    itself within 1 s outlives a profile that timed out with less left (CI under load saw
    one); the PID is killed only while that process still works in the folder, so a
    reused PID is safe. Best effort with its own short timeout: the profile's own error is
    the one to report."""
    folder = shlex.quote(remote_dir)
    line = (f'pid=$(cat {folder}/{_PID_FILE} 2>/dev/null) && [ "$(readlink /proc/$pid/cwd)" = "$(cd {folder} && pwd -P)" ] '
            f'&& kill -9 $pid; rm -rf -- {folder}')
    try:
        subprocess.run(_ssh_command(access, line), capture_output=True, timeout=_CLEANUP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        pass


def _remaining(device: Device, deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise timeout_error(device)
    return remaining


def _raise_ssh_failure(device: Device, completed: subprocess.CompletedProcess) -> None:
    stderr = " ".join(completed.stderr.split()).rstrip(".") or "no message"
    reason = next((r for r, words in _SSH_FAILURES if any(w in stderr for w in words)), "failed")
    access = device.ssh
    where = f"{access.user}@{access.host}, port {access.port}"
    raise DeviceError(f"Device '{device.name}' ({where}) {_WHAT_FAILED[reason]}: {stderr}.",
                      reason=reason, hint=_HINTS.get(reason))
