"""Targets are data: one TOML file per target in ``targets/``.

A target names a backend (which lowering and runtime to use), an architecture, a default
precision, thread count and backend-specific runtime options. Adding a target is adding a
file; nothing in the code branches on a target's name.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from edgec.errors import QuantizationError, TargetError
from edgec.passes.quantize import QuantScheme
from edgec.verify import Criterion

TARGETS_DIR = Path(os.environ.get("EDGEC_TARGETS_DIR", Path(__file__).resolve().parent.parent / "targets"))

KNOWN_BACKENDS = ("tflite", "ort")
KNOWN_ARCHS = ("arm64", "x86_64")
# What platform.machine() and device inventories call the same architectures.
_ARCH_ALIASES = {"aarch64": "arm64", "amd64": "x86_64", "x64": "x86_64"}
KNOWN_PRECISIONS = ("fp32", "fp16", "int8")
# What verification demands of each precision unless a target's [verify.<precision>] says otherwise.
DEFAULT_CRITERIA = {
    "fp32": Criterion(tolerance=1e-4, noise_floor=1e-6),
    "fp16": Criterion(tolerance=1e-2, noise_floor=1e-3),
    "int8": Criterion(min_cosine=0.98),
}
_TOP_LEVEL_KEYS = {"name", "description", "backend", "arch", "precision", "runtime", "verify", "quantize"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    arch: str
    precision: str
    threads: int
    runtime: dict[str, Any]
    criteria: dict[str, Criterion]
    path: str
    quantize: QuantScheme = QuantScheme()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["criteria"] = {p: c.to_dict() for p, c in self.criteria.items()}
        data["path"] = Path(self.path).name
        data["quantize"] = self.quantize.to_dict()
        return data


def known_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml") if p.stem != "devices")


def load_target(name_or_path: str, directory: Path = TARGETS_DIR) -> Target:
    """Load a target by name (``tflite-arm``) or by path to a ``.toml`` file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(known_targets(directory)) or "none"
        raise TargetError(
            f"Unknown target '{name_or_path}'. Known targets: {known}.",
            hint=f"Pick one of those, or add a TOML file to {directory}/ (see README.md, 'Adding a target').",
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TargetError(f"Target file '{path}' is not valid TOML: {exc}.") from exc
    return _parse(data, path)


def _parse(data: dict[str, Any], path: Path) -> Target:
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise TargetError(f"Target file '{path}' has unknown keys {unknown}; allowed: {sorted(_TOP_LEVEL_KEYS)}.")
    runtime = dict(data.get("runtime", {}))
    verify = dict(data.get("verify", {}))
    target = Target(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        backend=_choice(data, "backend", KNOWN_BACKENDS, path),
        arch=_choice(data, "arch", KNOWN_ARCHS, path),
        precision=_choice(data, "precision", KNOWN_PRECISIONS, path, default="fp32"),
        threads=int(runtime.pop("threads", 1)),
        runtime=runtime,
        criteria=_criteria(verify, path),
        path=str(path),
        quantize=_quantize(data.get("quantize", {}), path),
    )
    if target.threads < 1:
        raise TargetError(f"Target file '{path}': runtime.threads must be at least 1, not {target.threads}.")
    return target


def _criteria(verify: dict[str, Any], path: Path) -> dict[str, Criterion]:
    """``[verify]`` holds the fp32 criterion; ``[verify.fp16]``/``[verify.int8]`` the others."""
    tables = {"fp32": {k: v for k, v in verify.items() if k not in KNOWN_PRECISIONS}}
    tables.update({p: v for p, v in verify.items() if p in KNOWN_PRECISIONS})
    criteria = dict(DEFAULT_CRITERIA)
    for precision, table in tables.items():
        allowed = {f.name for f in dataclasses.fields(Criterion)}
        if not isinstance(table, dict) or set(table) - allowed:
            raise TargetError(f"Target file '{path}': [verify] entries for {precision} may only set {sorted(allowed)}.")
        criteria[precision] = dataclasses.replace(DEFAULT_CRITERIA[precision], **{k: float(v) for k, v in table.items()})
    return criteria


def _quantize(table: Any, path: Path) -> QuantScheme:
    """``[quantize]``: the int8 scheme this target's runtime runs fast (see QuantScheme)."""
    if not isinstance(table, dict):
        raise TargetError(f"Target file '{path}': [quantize] must be a table.")
    try:
        return QuantScheme.from_table(table)
    except QuantizationError as exc:
        raise TargetError(f"Target file '{path}': {exc.message}", hint=exc.hint) from exc


def _choice(data: dict[str, Any], key: str, allowed: tuple[str, ...], path: Path, default: str | None = None) -> str:
    value = data.get(key, default)
    if value not in allowed:
        raise TargetError(f"Target file '{path}': {key} must be one of {list(allowed)}, not {value!r}.")
    return str(value)


def same_arch(machine: str, arch: str) -> bool:
    """Whether a machine name (``platform.machine()``, a device's ``arch``) is the target ``arch``:
    Linux on ARM says aarch64 where targets say arm64."""
    return _ARCH_ALIASES.get(machine.lower(), machine.lower()) == _ARCH_ALIASES.get(arch.lower(), arch.lower())
