"""Devices are data: ``targets/devices.toml`` lists where artifacts can be profiled.

A device is this machine (``local``), a board reached over SSH (``ssh``) or an arm64 core
emulated by qemu on this machine (``emulated``). A user's own file (``--devices FILE``) adds
devices, and one of the same name replaces the built-in entry as a whole, so a half-merged
device (a new host with an old key) can never happen. Every mistake in a file is reported
with the device, the key and what to write instead.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import tomllib
from pathlib import Path
from typing import Any

from edgec.errors import DeviceError
from edgec.targets import TARGETS_DIR

DEVICES_FILE = TARGETS_DIR / "devices.toml"
KINDS = ("local", "ssh", "emulated")
ARCHS = ("x86_64", "aarch64")
RUNTIMES = ("onnxruntime", "litert")
DEFAULT_TIMEOUT_S = 600.0
# Nothing ssh could read as an option or a second destination.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]*")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

_COMMON_KEYS = {"kind", "description", "arch", "runtimes", "threads", "timeout_s"}
_KIND_KEYS = {
    "local": {"python"},
    "ssh": {"python", "host", "user", "port", "key", "known_hosts", "connect_timeout_s"},
    "emulated": {"cpu", "root"},
}
_REQUIRED_KEYS = {
    "local": {"kind", "runtimes"},
    "ssh": {"kind", "arch", "runtimes", "threads", "host", "user", "key"},
    "emulated": {"kind", "arch", "runtimes", "threads", "cpu", "root"},
}


@dataclasses.dataclass(frozen=True)
class SshAccess:
    """How to reach a board: ``ssh -i key -p port user@host``, host key checked against
    ``known_hosts`` (None: ssh's own known_hosts files)."""

    host: str
    user: str
    key: Path
    port: int = 22
    known_hosts: Path | None = None
    connect_timeout_s: float = 10.0


@dataclasses.dataclass(frozen=True)
class Emulation:
    """An arm64 core emulated by qemu: the CPU model pinned and the folder ``make arm-emulator``
    filled (arm64 root file system, runtimes, instruction-count plugin)."""

    cpu: str
    root: Path


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    kind: str
    arch: str
    runtimes: tuple[str, ...]
    threads: int
    description: str = ""
    python: str | None = None  # None: this Python (local), "python3" (ssh); emulated: the root's
    timeout_s: float = DEFAULT_TIMEOUT_S
    ssh: SshAccess | None = None
    emulation: Emulation | None = None

    @property
    def emulated(self) -> bool:
        return self.kind == "emulated"

    def summary(self) -> dict[str, Any]:
        """The ``device`` block of a measurement (see edgec/profile/schema.py), as far as the
        inventory knows it (the runner reports arch and, off emulators, the CPU's name)."""
        return {"name": self.name, "kind": self.kind, "arch": self.arch,
                "cpu": self.emulation.cpu if self.emulation else None, "emulated": self.emulated}


def load_devices(path: str | os.PathLike[str] | None = None,
                 builtin: Path = DEVICES_FILE) -> dict[str, Device]:
    """The built-in devices, plus (and overridden by) those in the user's file ``path``."""
    devices = _read_file(builtin)
    if path is not None:
        devices.update(_read_file(Path(path)))
    return devices


def get_device(name: str, path: str | os.PathLike[str] | None = None) -> Device:
    devices = load_devices(path)
    if name not in devices:
        raise DeviceError(
            f"Unknown device '{name}'. Known devices: {', '.join(sorted(devices))}.",
            reason="config",
            hint=f"Pick one of those, or describe it in a TOML file given with --devices (see {DEVICES_FILE}).",
        )
    return devices[name]


def _read_file(path: Path) -> dict[str, Device]:
    if not path.is_file():
        raise DeviceError(f"Device file '{path}' does not exist.", reason="config",
                          hint="Give the path of a TOML file like targets/devices.toml.")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeviceError(f"Device file '{path}' is not valid TOML: {exc}.", reason="config") from exc
    devices = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise DeviceError(f"'{name}' in device file '{path}' is not a table.", reason="config",
                              hint=f"Describe each device in its own table: [{name}] then its keys.")
        devices[name] = _parse(name, entry, path.parent, _Where(name, path))
    return devices


@dataclasses.dataclass(frozen=True)
class _Where:
    """Names the place of a mistake in every message."""

    device: str
    path: Path

    def error(self, problem: str, hint: str | None = None) -> DeviceError:
        return DeviceError(f"Device '{self.device}' in '{self.path}': {problem}.", reason="config", hint=hint)


def _parse(name: str, entry: dict[str, Any], folder: Path, where: _Where) -> Device:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise where.error(f"kind is {kind!r}", hint=f"Set kind to one of {list(KINDS)}.")
    allowed = _COMMON_KEYS | _KIND_KEYS[kind]
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise where.error(f"unknown keys {unknown} for a {kind} device", hint=f"Allowed keys: {sorted(allowed)}.")
    missing = sorted(_REQUIRED_KEYS[kind] - set(entry))
    if missing:
        raise where.error(f"missing keys {missing}", hint=f"A {kind} device needs {sorted(_REQUIRED_KEYS[kind])}.")
    threads = _positive_int(entry, "threads", where, _usable_cpus() if kind == "local" else None)
    if kind == "emulated" and threads != 1:
        raise where.error(f"threads is {threads}",
                          hint="Set threads = 1: instruction counts are deterministic only single-threaded.")
    return Device(
        name=name,
        kind=kind,
        arch=_arch(entry, kind, where),
        runtimes=_runtimes(entry, where),
        threads=threads,
        description=_string(entry, "description", where, ""),
        python=_string(entry, "python", where),
        timeout_s=_positive_number(entry, "timeout_s", where, DEFAULT_TIMEOUT_S),
        ssh=_ssh(entry, folder, where) if kind == "ssh" else None,
        emulation=Emulation(_string(entry, "cpu", where), _path(entry, "root", folder, where))
        if kind == "emulated" else None,
    )


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _ssh(entry: dict[str, Any], folder: Path, where: _Where) -> SshAccess:
    port = _positive_int(entry, "port", where, 22)
    if port > 65535:
        raise where.error(f"port is {port}", hint="Give a TCP port between 1 and 65535.")
    host, user = _string(entry, "host", where), _string(entry, "user", where)
    if not _HOST.fullmatch(host):
        raise where.error(f"host is {host!r}", hint="Give a host name or IP address (letters, digits, '.', '-', ':').")
    if not _USER.fullmatch(user):
        raise where.error(f"user is {user!r}", hint="Give a user name (letters, digits, '.', '_', '-').")
    return SshAccess(
        host=host,
        user=user,
        key=_ssh_path(entry, "key", folder, where),
        port=port,
        known_hosts=_ssh_path(entry, "known_hosts", folder, where) if "known_hosts" in entry else None,
        connect_timeout_s=_positive_number(entry, "connect_timeout_s", where, 10.0),
    )


def _ssh_path(entry: dict[str, Any], key: str, folder: Path, where: _Where) -> Path:
    path = _path(entry, key, folder, where)
    if re.search(r'[%"]', str(path)):
        raise where.error(f"{key} is '{path}'", hint="ssh reads '%' and '\"' in file names specially: "
                                                    "move or rename the file.")
    return path


def _arch(entry: dict[str, Any], kind: str, where: _Where) -> str:
    arch = entry.get("arch", platform.machine() if kind == "local" else None)
    if arch not in ARCHS:
        raise where.error(f"arch is {arch!r}", hint=f"Set arch to one of {list(ARCHS)}.")
    return arch


def _runtimes(entry: dict[str, Any], where: _Where) -> tuple[str, ...]:
    runtimes = entry["runtimes"]
    if not isinstance(runtimes, list) or not runtimes or any(r not in RUNTIMES for r in runtimes):
        raise where.error(f"runtimes is {runtimes!r}",
                          hint=f"List the runtimes installed on the device, from {list(RUNTIMES)}.")
    return tuple(runtimes)


def _string(entry: dict[str, Any], key: str, where: _Where, default: str | None = None) -> Any:
    """``entry[key]`` (present: required keys were checked before), or ``default``."""
    if key not in entry:
        return default
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise where.error(f"{key} is {value!r}", hint=f"Give {key} as a non-empty string in quotes.")
    return value


def _positive_int(entry: dict[str, Any], key: str, where: _Where, default: int | None = None) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise where.error(f"{key} is {value!r}", hint=f"Give {key} as a whole number of at least 1.")
    return value


def _positive_number(entry: dict[str, Any], key: str, where: _Where, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise where.error(f"{key} is {value!r}", hint=f"Give {key} as a number of seconds above 0.")
    return float(value)


def _path(entry: dict[str, Any], key: str, folder: Path, where: _Where) -> Path:
    return (folder / Path(_string(entry, key, where)).expanduser()).resolve()
