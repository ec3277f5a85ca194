"""Count many single-kernel models in one process on a device: what calibration measures.

edgec copies this file beside device_runner.py (whose model classes it uses) onto an emulated
core and runs it once for a batch of models, so the emulator's start-up (seconds: Python and
the runtimes' imports under qemu) is paid once per batch, not once per model. Like
device_runner.py it must not import edgec::

    python3 batch_runner.py --runs 1,4,... a.tflite b.tflite ...

A model's count must not depend on what ran before it in the process. Python 3.11's
interpreter specializes the bytecode of the run loop over its first executions, and the
allocator's state drifts as models come and go; a tiny model measured as the second of a
batch or as the fourteenth differed by 7%. So the process first runs the first model many
times (the loop's bytecode is then specialized for every later model), each model gets
warm-up runs with the garbage collector off, and its count is the difference of two counted
windows of ``r`` and ``2r`` runs: whatever a window costs besides its runs (the marks, the
loop's set-up) cancels out. For each model in order: three marks; a model that fails to
load still gets them (with no runs between), so the marks stay aligned with the models.
stdout holds one JSON list with an entry per model: ``{"runs": r}`` or ``{"error": message}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import device_runner

MARKS = 3  # per model: before, between and after the windows of r and 2r runs
WARMUP = 2  # runs before counting: the first allocates the interpreter's buffers
PRIME = 24  # runs of the first model before anything is counted: specializes the run loop's bytecode


def count(path: str, runs: int, warmup: int = WARMUP) -> dict:
    """Mark the instruction count around windows of ``runs`` and ``2 * runs`` inferences of ``path``."""
    try:
        model = device_runner.load(path, device_runner.runtime_for(path), 1)
        feeds = device_runner.random_feeds(model.inputs, 0)
        for _ in range(warmup):
            model.run(feeds)
    except device_runner.Failure as failure:
        for _ in range(MARKS):
            device_runner.mark()
        return {"error": failure.message}
    gc.collect()
    gc.disable()
    try:
        device_runner.mark()
        for repeats in (runs, 2 * runs):
            _run(model, feeds, repeats)
            device_runner.mark()
    finally:
        gc.enable()
    return {"runs": runs}


def _run(model, feeds: dict, repeats: int) -> None:
    for _ in range(repeats):
        model.run(feeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--runs", default="1", help="runs of the first window per model: one number, or one per artifact (commas)")
    args = parser.parse_args(argv)
    runs = [int(r) for r in args.runs.split(",")]
    runs = runs * len(args.artifacts) if len(runs) == 1 else runs
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the runtimes print goes to stderr; stdout carries only the result
    results = [count(path, r, PRIME if i == 0 else WARMUP) for i, (path, r) in enumerate(zip(args.artifacts, runs))]
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(results) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
