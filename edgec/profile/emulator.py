"""Profile on an arm64 core emulated by qemu on this machine (``make arm-emulator`` sets it up).

The runner runs in qemu's user-mode emulation of the pinned CPU model, inside the arm64
Debian root that emulator_setup.sh made, with the aarch64 wheels of the pinned runtimes.
Emulated wall time is not the latency of any board (qemu runs hundreds of times slower than
native and its times jump by tens of percent between runs): the measurement keeps it but
marks the device ``emulated``. What compares variants there is ``cost``, counted by a qemu
plugin (insn_count.c) and deterministic::

    "cost": {"cpu": "cortex-a76", "instructions": 19813.0, "vector_instructions": 1498.0,
             "counted_runs": 5, "method": "qemu-insn-count"}

``instructions`` and ``vector_instructions`` (AdvSIMD vector data processing) are guest
instructions per inference: (count at N2 runs - count at N1 runs) / (N2 - N1), marked
from inside one runner process after its timed runs, so start-up, loading and timers stay
out. Runs are single-threaded (inline counters are exact only then), with a fixed hash seed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgec.errors import DeviceError
from edgec.profile.devices import Device, Emulation
from edgec.profile.schema import ProfileSettings
from edgec.profile.transport import (
    RUNNER,
    read_result,
    run_with_timeout,
    runner_arguments,
    stage,
    staged_name,
)

COUNT_RUNS = (1, 6)  # N1, N2: the first counted run is left out, five are counted
GUEST_PYTHON = "usr/bin/python3"
PLUGIN = "plugin/libinsn_count.so"
SETUP_HINT = ("Run `make arm-emulator` (about a minute; installs qemu-user, mmdebstrap and gcc with apt-get "
              "if they are missing).")


def setup_problem(emulation: Emulation) -> str | None:
    """Why this emulated device cannot run yet, or None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed"
    if not (emulation.root / "READY").is_file():
        return f"the emulator folder '{emulation.root}' is not set up"
    if not (emulation.root / emulation.cpu / "proc" / "cpuinfo").is_file():
        cpus = sorted(p.parent.parent.name for p in emulation.root.glob("*/proc/cpuinfo"))
        return f"CPU model '{emulation.cpu}' is not set up in '{emulation.root}' (set up: {', '.join(cpus)})"
    if "," in str(emulation.root):
        return f"qemu cannot load a plugin from a path with a comma: '{emulation.root}'"
    return None


def run_emulated(device: Device, artifact: Path, settings: ProfileSettings, threads: int) -> dict:
    """The runner's result for ``artifact`` on ``device``'s emulated core, with ``cost`` added."""
    emulation = ready_emulation(device)
    if threads != 1:
        raise DeviceError(f"Emulated device '{device.name}' runs single-threaded, not with {threads} threads.",
                          reason="config", hint="Leave --threads out for emulated devices.")
    with tempfile.TemporaryDirectory(prefix="edgec-emu-") as folder:
        folder = Path(folder)
        stage(artifact, folder)
        marks = folder / "marks.txt"
        command = [*counting_command(emulation, marks), RUNNER.name, *runner_arguments(staged_name(artifact), settings, 1),
                   "--count-marker", "--count-runs", *map(str, COUNT_RUNS)]
        result = read_result(device, run_with_timeout(device, command, cwd=folder, env=guest_env(emulation, folder)))
        result["cost"] = _cost(device, marks, result.pop("count"))
    return result


def ready_emulation(device: Device) -> Emulation:
    """``device``'s emulation, or a DeviceError saying how to set it up."""
    problem = setup_problem(device.emulation)
    if problem:
        raise DeviceError(f"Emulated device '{device.name}' cannot run: {problem}.", reason="not_set_up",
                          hint=SETUP_HINT)
    return device.emulation


def counting_command(emulation: Emulation, marks: Path) -> list[str]:
    """The guest Python under qemu with the instruction-count plugin writing ``marks``;
    the script and its arguments follow."""
    root = emulation.root / emulation.cpu
    return ["qemu-aarch64", "-L", str(root), "-plugin", f"{emulation.root / PLUGIN},out={marks}", str(root / GUEST_PYTHON)]


def guest_env(emulation: Emulation, home: Path) -> dict[str, str]:
    """Only what the guest needs, so nothing of the host's Python setup leaks in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
            "QEMU_CPU": emulation.cpu, "PYTHONPATH": "/opt/site", "PYTHONHASHSEED": "0"}


def _cost(device: Device, marks: Path, count: dict) -> dict:
    lines = marks.read_text().split() if marks.is_file() else []
    if len(lines) != 4:
        raise DeviceError(f"Emulated device '{device.name}': the instruction-count plugin recorded "
                          f"{len(lines) // 2} marks, not 2.", reason="not_set_up", hint=SETUP_HINT)
    (total_1, vector_1), (total_2, vector_2) = (map(int, lines[:2]), map(int, lines[2:]))
    runs = count["n2"] - count["n1"]
    return {"cpu": device.emulation.cpu, "instructions": (total_2 - total_1) / runs,
            "vector_instructions": (vector_2 - vector_1) / runs, "counted_runs": runs, "method": "qemu-insn-count"}
