"""``edgec device calibrate D``: sample kernel configurations, lower, measure on D, fit.

Measurements are appended to the device's ``samples.jsonl`` batch by batch, so an
interrupted calibration continues where it stopped; batch ``i`` always draws the same
configurations (seeded by ``i``), so a resumed run measures what an uninterrupted one would.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from edgec.build import canonicalize, input_specs
from edgec.errors import EdgecError, EdgecWarning
from edgec.executors import Executor, Outcome, Task
from edgec.executors.local import LocalExecutor
from edgec.lower import LowerOptions, lower
from edgec.predict.kernels import DETECTOR, interface_of, kernels_of
from edgec.predict.measure import measure_batch
from edgec.predict.model import Predictor, PredictorStore
from edgec.predict.space import SHARE, SIZES, Sample, draw, to_onnx
from edgec.profile.devices import Device
from edgec.targets import load_target
from edgec.verify import random_inputs

PRECISIONS = ("fp32", "int8")
BASE = Sample("Relu", "fp32", {"h": 1, "c": 8})  # the trivial model every batch starts with
BATCH = {"local": 16, "emulated": 20}  # emulated: one emulator process (PER_EMULATOR) with the base model
TFLITE_TARGETS = {"x86_64": "tflite-x86", "aarch64": "tflite-arm"}
CALIBRATION_BATCHES = 4  # random int8 calibration samples per configuration


def calibrate(device: Device, store: PredictorStore, minutes: float, threads: int,
              progress: Callable[[int, float], None] = lambda samples, seconds: None,
              ops: Sequence[str] = tuple(SIZES), precisions: Sequence[str] = PRECISIONS,
              batch_size: int | None = None, executor: Executor | None = None) -> Predictor:
    """Measure batches on ``device`` for ``minutes`` (at least one batch if there are no
    measurements yet; none with ``minutes`` 0: a refit), then fit and save.

    ``progress(samples measured, seconds elapsed)`` is called after every round; batches
    cycle over ``ops`` × ``precisions``, ``batch_size`` samples each (default: the device kind's).
    On ``executor`` a round is one batch per worker: the samples are lowered as parallel
    tasks, then each batch measured (emulated cores in parallel, a board one batch at a time)."""
    executor = executor or LocalExecutor()
    target = load_target(TFLITE_TARGETS[device.arch])
    records = [r for r in _redetected(store, executor, target.name) if r["threads"] == threads]  # timings at other thread counts do not mix
    start = time.monotonic()
    pairs = [(op, precision) for op in ops for _ in range(SHARE.get(op, 1)) for precision in precisions]
    size = batch_size or BATCH[device.kind]
    while not records or time.monotonic() - start < minutes * 60:
        first = len({r["batch"] for r in records})
        batches = {batch: _draw(pairs, batch, size) for batch in range(first, first + executor.workers)}
        for measured in _measure(executor, device, target.name, batches, threads):
            records += store.append(measured)
        progress(len(records), time.monotonic() - start)
    predictor = Predictor.fit(records, device, threads, target.name)
    store.save(predictor)
    return predictor


def _redetected(store: PredictorStore, executor: Executor, target: str) -> list[dict]:
    """The store's samples, those whose kernels an older detector read (``DETECTOR``) lowered
    again and read anew, and the samples file rewritten with them: a change in how kernels
    are detected needs no new measurements. A sample that no longer lowers is dropped."""
    records = store.samples()
    stale = {i for i, r in enumerate(records) if r.get("detector") != DETECTOR}
    if not stale:
        return records
    outcomes = executor.run([Task(_lower, (Sample(**records[i]["sample"]), target)) for i in sorted(stale)])
    fresh = {i: _detected(records[i], o.value) for i, o in zip(sorted(stale), outcomes) if o.ok and o.value is not None}
    kept = [fresh.get(i, r) for i, r in enumerate(records) if i not in stale or i in fresh]
    store.rewrite(kept)
    return kept


def _detected(record: dict, content: bytes) -> dict:
    return {**record, "kernels": [k.to_dict() for k in kernels_of(content)], "io": interface_of(content).to_dict(),
            "detector": DETECTOR}


def _draw(pairs: Sequence[tuple[str, str]], batch: int, size: int) -> list[Sample]:
    """Batch ``batch``'s samples: the same whichever run or worker draws them."""
    rng = np.random.default_rng(batch)
    return [draw(*pairs[(batch * size + j) % len(pairs)], rng) for j in range(size)]


def _measure(executor: Executor, device: Device, target: str, batches: dict[int, list[Sample]], threads: int) -> list[list[dict]]:
    """Each batch's records, in batch order: the base model, then each sample's artifact; records for those that ran."""
    samples = [s for batch in batches.values() for s in batch]
    outcomes = executor.run([Task(_lower, (s, target)) for s in [BASE, *samples]])
    failed = [o.error for o in outcomes if not o.ok]
    if failed:  # a bug in a lowering rule, or a worker lost: those samples are left out, and said so
        warnings.warn(f"{len(failed)} calibration samples failed to lower and were left out (first: {failed[0]}).",
                      EdgecWarning, stacklevel=3)
    lowered = [o.value for o in outcomes]
    base_model, contents = lowered[0], iter(lowered[1:])
    ran = {batch: [(s, c) for s in batch_samples if (c := next(contents)) is not None] for batch, batch_samples in batches.items()}
    board = None if device.emulated else device.name
    measured = executor.run([Task(measure_batch, (device, [base_model] + [c for _, c in pairs], threads), board=board)
                             for pairs in ran.values()])
    return [_records(device, batch, pairs, outcome, threads) for (batch, pairs), outcome in zip(ran.items(), measured)]


def _records(device: Device, batch: int, lowered: list[tuple[Sample, bytes]], outcome: Outcome, threads: int) -> list[dict]:
    base, *costs = outcome.value if outcome.ok else [None]
    if base is None:
        raise EdgecError(f"Device '{device.name}' could not run the trivial calibration model"
                         f"{f' ({outcome.error})' if outcome.error else ''}.",
                         hint="Check the device with `edgec profile` on a small artifact first.")
    return [_detected({"batch": batch, "sample": sample.to_dict(), "cost": cost, "base": base, "threads": threads}, content)
            for (sample, content), cost in zip(lowered, costs) if cost is not None]


def _lower(sample: Sample, target: str) -> bytes | None:
    """The sample's artifact for ``target`` (int8 with int8 I/O: the kernel alone), or None
    where the lowering refuses this configuration."""
    model, _ = canonicalize(ir.from_proto(to_onnx(sample)), {})
    options = LowerOptions()
    if sample.precision == "int8":
        options = LowerOptions("int8", random_inputs(input_specs(model), count=CALIBRATION_BATCHES), int8_io=True)
    try:
        lowered = lower(model, load_target(target), "kernel", options)
    except EdgecError:
        return None
    return lowered.files[lowered.primary]
