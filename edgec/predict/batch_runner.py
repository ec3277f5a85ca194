"""Count many single-kernel models in one process on a device: what calibration measures.

edgec copies this file beside device_runner.py (whose model classes it uses) onto an emulated
core and runs it once for a batch of models, so the emulator's start-up (seconds: Python and
the runtimes' imports under qemu) is paid once per batch, not once per model. Like
device_runner.py it must not import edgec::

    python3 batch_runner.py --runs 3 a.tflite b.tflite ...

For each model in order: load it, run it once (warm-up), mark the instruction count, run it
``--runs`` times, mark again; a model that fails to load still gets its two marks (with no
runs between), so the marks stay aligned with the models. stdout holds one JSON list with
an entry per model: ``{"runs": N}`` or ``{"error": message}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import device_runner


def count(path: str, runs: int) -> dict:
    """Mark the instruction count around ``runs`` inferences of ``path`` after one warm-up."""
    try:
        model = device_runner.load(path, device_runner.runtime_for(path), 1)
        feeds = device_runner.random_feeds(model.inputs, 0)
        model.run(feeds)
    except device_runner.Failure as failure:
        device_runner.mark()
        device_runner.mark()
        return {"error": failure.message}
    return {"runs": device_runner.counted_runs(model, feeds, 0, runs)["n2"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the runtimes print goes to stderr; stdout carries only the result
    results = [count(path, args.runs) for path in args.artifacts]
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(results) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
