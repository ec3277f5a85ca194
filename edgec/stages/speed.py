"""The speed check of int8 builds: ship int8 only if it is faster than fp32 here or on a device."""

from __future__ import annotations

import contextlib
import platform
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.errors import EdgecWarning
from edgec.lower import Lowered, LowerOptions, lower, lower_ahead
from edgec.profile import Device, ProfileSettings, compare_latency, profile
from edgec.profile.kernels import compare_kernels, slower_in_int8
from edgec.runtime import open_runner
from edgec.stages.context import Progress
from edgec.stages.verify import write_primary
from edgec.targets import Target, same_arch

def speed_check(model: ir.Model, target: Target, stem: str, int8: Lowered, device: Device | None,
                progress: Progress, feeds: Mapping[str, np.ndarray] | None = None) -> tuple[Lowered, dict[str, Any]]:
    """``choose_faster``, shown as a stage when something is measured at all."""
    with progress.stage(_speed_check_stage(device)) if _measurable(target, device) else contextlib.nullcontext():
        return choose_faster(model, target, stem, int8, device, feeds)


def start_speed_check(model: ir.Model, target: Target, device: Device | None) -> None:
    """Start the fp32 lowering the speed check will time, ahead (``edgec.lower.lower_ahead``)."""
    if _measurable(target, device):
        lower_ahead(model, target, LowerOptions("fp32"))


def _measurable(target: Target, device: Device | None) -> bool:
    """Whether the target's code runs on ``device``, or here without one."""
    return device is not None or same_arch(platform.machine(), target.arch)


def _speed_check_stage(device: Device | None) -> str:
    """What the speed check really does: time here or on a board, or count emulated instructions."""
    if device is None:
        return "Timing int8 against fp32 on this host"
    if device.emulation is not None:
        return f"Counting instructions of int8 and fp32 on emulated device {device.name}"
    return f"Timing int8 against fp32 on device {device.name}"


def _unmeasured(target: Target) -> dict[str, Any]:
    """The speed check's record when nothing here can run the target's code, and a warning saying so."""
    reason = f"this host is {platform.machine()}, the target {target.arch}"
    warnings.warn(f"The int8 artifact's speed was not checked against fp32 ({reason}); int8 is shipped unmeasured. "
                  "Pass --speed-check-on DEVICE to check on a device of the target's architecture (e.g. emulated-a76), "
                  "or --no-speed-check to ship int8 without this warning.", EdgecWarning, stacklevel=5)
    return {"shipped": "int8", "measured": False, "reason": f"{reason}; --speed-check-on DEVICE checks on one"}


def choose_faster(model: ir.Model, target: Target, stem: str, int8: Lowered, device: Device | None = None,
                  feeds: Mapping[str, np.ndarray] | None = None) -> tuple[Lowered, dict[str, Any]]:
    """Keep the int8 artifact only if it is faster than fp32 here, or on ``device``; say which and why.
    Here, both run on ``feeds`` (the build's own data; random integers can divide by 0).

    An emulated device is judged by instructions per inference (deterministic; its wall time
    is not latency). When fp32 wins here, both artifacts' kernels are profiled and the ones
    int8 loses on are named. Without a device of the target's architecture the int8 artifact
    is kept, with a warning, and the report says the check was not possible.
    """
    if not _measurable(target, device):
        return int8, _unmeasured(target)
    fp32 = lower(model, target, stem, LowerOptions("fp32"))
    with tempfile.TemporaryDirectory(prefix="edgec-speed-") as tmp:
        paths = {name: write_primary(Path(tmp) / name, lowered) for name, lowered in (("fp32", fp32), ("int8", int8))}
        decision = _time_on_device(paths, device) if device else _time_here(paths, target, feeds)
        unit = decision["metric"]
        if decision[f"int8_{unit}"] < decision[f"fp32_{unit}"]:
            return int8, {"shipped": "int8", **decision}
        if device is None:
            runs = max(3, min(HOST_SPEED_RUNS, int(HOST_SPEED_BUDGET_S * 1e3 / decision["fp32_ms"])))
            decision["kernels"] = compare_kernels(paths["fp32"], paths["int8"], target.threads, runs, feeds)
    _warn_fp32_shipped(decision)
    return fp32, {"shipped": "fp32", **decision}


def _warn_fp32_shipped(decision: dict[str, Any]) -> None:
    unit, slower = decision["metric"], slower_in_int8(decision.get("kernels", []))
    warnings.warn(
        f"The int8 artifact is not faster than fp32 on {decision['on']} ({decision[f'int8_{unit}']:.4g} vs "
        f"{decision[f'fp32_{unit}']:.4g} {SPEED_UNITS[unit]}, {decision['threads']} threads)"
        f"{f'; slower in int8: {slower}' if slower else ''}. The fp32 artifact was built instead. "
        "Pass --no-speed-check to ship int8 anyway.",
        EdgecWarning,
        stacklevel=4,
    )


SPEED_UNITS = {"ms": "ms", "instructions": "instructions per inference"}
# Per artifact and round: 20 runs of a small model; of a large one (100+ ms a run) what fits
# in the budget, so timing a 3-GMAC detector takes seconds, not a minute.
HOST_SPEED_RUNS, HOST_SPEED_ROUNDS, HOST_SPEED_BUDGET_S, HOST_SPEED_WARMUP = 20, 3, 1.5, 3
DEVICE_SPEED_ROUNDS, DEVICE_SPEED_SETTINGS = 3, ProfileSettings(warmup=3, runs=20, ops=False)
# Emulated wall time is not latency; the instruction count is taken apart from the timed runs.
EMULATED_SPEED_SETTINGS = ProfileSettings(warmup=0, runs=1, ops=False)


def _time_here(paths: dict[str, Path], target: Target, feeds: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """Alternating rounds of both artifacts in this process, at the target's threads."""
    runners = {name: open_runner(path, threads=target.threads, options=target.runtime) for name, path in paths.items()}
    latency = compare_latency(runners, HOST_SPEED_RUNS, HOST_SPEED_ROUNDS, HOST_SPEED_BUDGET_S, HOST_SPEED_WARMUP, feeds)
    return {"measured": True, "on": "this host", "metric": "ms", "threads": target.threads,
            **{f"{name}_ms": round(latency[name]["best_median_ms"], 4) for name in paths}}


def _time_on_device(paths: dict[str, Path], device: Device) -> dict[str, Any]:
    """Both artifacts on ``device``: instructions per inference on an emulated core (they are
    deterministic), else the best median latency of alternating rounds."""
    decision = {"measured": True, "on": f"device {device.name}", "threads": device.threads}
    if device.emulation is not None:
        costs = {name: profile(path, device, EMULATED_SPEED_SETTINGS)["cost"] for name, path in paths.items()}
        return {**decision, "metric": "instructions", **{f"{name}_instructions": c["instructions"] for name, c in costs.items()}}
    medians: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(DEVICE_SPEED_ROUNDS):
        for name, path in paths.items():
            medians[name].append(profile(path, device, DEVICE_SPEED_SETTINGS)["latency_ms"]["median"])
    return {**decision, "metric": "ms", **{f"{name}_ms": round(min(m), 4) for name, m in medians.items()}}
