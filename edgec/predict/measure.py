"""Measure a batch of calibration artifacts on a device: milliseconds here, instructions on
an emulated core.

A batch starts with a trivial model (``base``); on a CPU shared with other work, the fit
divides each batch's costs by how much slower its trivial model ran than the median one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from edgec.errors import DeviceError
from edgec.predict.kernels import kernels_of
from edgec.profile import device_runner
from edgec.profile.devices import Device
from edgec.profile.emulator import counting_command, guest_env, ready_emulation
from edgec.profile.transport import RUNNER, read_result, run_with_timeout

LOCAL_RUNS, LOCAL_ROUNDS, LOCAL_WARMUP = 20, 3, 3  # timed runs per round; rounds alternate over the batch
# Other load only ever adds time, and on a shared machine a run of tens of milliseconds is
# rarely left alone: the 10th percentile of a round, not its median, is the model's own time.
LOCAL_QUANTILE = 10
# Runs of a model's first counted window (batch_runner.py): counts are deterministic, so a
# large model needs one; a tiny one (tens of thousands of instructions) gets more, so the few
# hundred instructions a window's count wanders by are a small part of it.
WINDOW_WORK, OVERHEAD_WORK, MAX_RUNS = 3e5, 3e4, 16  # MACs a window aims at, an inference's fixed part in MACs
PER_EMULATOR = 21  # the qemu plugin records at most 64 marks, three per model (batch_runner.MARKS)
BATCH_RUNNER = Path(__file__).with_name("batch_runner.py")  # a guest script: never imported here


def measure_batch(device: Device, artifacts: list[bytes], threads: int) -> list[float | None]:
    """The cost of one inference of each artifact (None where it failed to run)."""
    if device.kind == "local":
        return _time_here(artifacts, threads)
    if device.kind == "emulated":
        return [cost for start in range(0, len(artifacts), PER_EMULATOR)
                for cost in _count_emulated(device, artifacts[start:start + PER_EMULATOR])]
    raise DeviceError(f"Device '{device.name}' is a {device.kind} device; calibration measures on the local "
                      "device and on emulated cores so far.", reason="config",
                      hint="Calibrate `local`, `emulated-a53` or `emulated-a76`.")


def _time_here(artifacts: list[bytes], threads: int) -> list[float | None]:
    """Best round's 10th percentile (ms) of alternating rounds (load only ever adds time),
    each run as the device runner runs it: the artifact's own tensors in, invoke, out."""
    with tempfile.TemporaryDirectory(prefix="edgec-calibrate-") as folder:
        models = []
        for i, content in enumerate(artifacts):
            (Path(folder) / f"k{i}.tflite").write_bytes(content)
            models.append(device_runner.LiteRtModel(str(Path(folder) / f"k{i}.tflite"), threads))
    feeds = [device_runner.random_feeds(model.inputs, 0) for model in models]
    medians: list[list[float]] = [[] for _ in models]
    for _ in range(LOCAL_ROUNDS):
        for model, feed, rounds in zip(models, feeds, medians):
            for _ in range(LOCAL_WARMUP):
                model.run(feed)
            rounds.append(float(np.percentile(device_runner.timed_samples(model, feed, LOCAL_RUNS), LOCAL_QUANTILE)))
    return [min(rounds) for rounds in medians]


def _count_emulated(device: Device, artifacts: list[bytes]) -> list[float | None]:
    """Instructions per inference, all artifacts in one emulator process (batch_runner.py)."""
    emulation = ready_emulation(device)
    with tempfile.TemporaryDirectory(prefix="edgec-calibrate-") as folder:
        folder = Path(folder)
        names = []
        for i, content in enumerate(artifacts):
            names.append(f"k{i}.tflite")
            (folder / names[-1]).write_bytes(content)
        for script in (RUNNER, BATCH_RUNNER):
            (folder / script.name).write_bytes(script.read_bytes())
        marks = folder / "marks.txt"
        runs = [window_runs(content) for content in artifacts]
        command = [*counting_command(emulation, marks), BATCH_RUNNER.name,
                   "--runs", ",".join(map(str, runs)), *names]
        completed = run_with_timeout(device, command, device.timeout_s * len(artifacts), cwd=folder,
                                     env=guest_env(emulation, folder))
        results = _results(device, completed)
        totals = [int(line.split()[0]) for line in marks.read_text().splitlines()] if marks.is_file() else []
    if len(totals) != 3 * len(artifacts) or len(results) != len(artifacts):
        raise DeviceError(f"Emulated device '{device.name}': the batch of {len(artifacts)} calibration models "
                          f"left {len(totals)} instruction-count marks, not {3 * len(artifacts)}.", reason="failed")
    return [None if "error" in r else _per_inference(totals[3 * i:3 * i + 3], r["runs"]) for i, r in enumerate(results)]


def _per_inference(marks: list[int], runs: int) -> float:
    """A window of 2r runs minus one of r runs: what a window costs besides its runs cancels."""
    return ((marks[2] - marks[1]) - (marks[1] - marks[0])) / runs


def window_runs(content: bytes) -> int:
    """Runs of a model's first counted window, from its MACs (deterministic: the same model
    is always counted the same way)."""
    macs = sum(kernel.shape[-1] for kernel in kernels_of(content))
    return int(np.clip(round(WINDOW_WORK / (macs + OVERHEAD_WORK)), 1, MAX_RUNS))


def _results(device: Device, completed) -> list[dict]:
    try:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        read_result(device, completed)  # raises the runner's own error, if it gave one
        raise DeviceError(f"Calibration on device '{device.name}' failed (exit status {completed.returncode}).",
                          reason="failed") from None
