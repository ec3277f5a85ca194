"""One timed build in a fresh interpreter, for ``make bench``'s ``build_time`` section.

``timed_build`` starts ``python -m edgec.bench.timing`` and waits for it with ``os.wait4``,
so peak RSS and CPU time (all threads) are that build's alone and start-up (imports) is
measured apart from the build. The child records each build stage's wall time through the
build's ``Progress`` protocol and prints them as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


class StageTimes:
    """A build ``Progress`` that records each stage's wall time."""

    def __init__(self) -> None:
        self.stages: list[dict] = []

    @contextlib.contextmanager
    def stage(self, description: str):
        start = time.perf_counter()
        yield
        self.stages.append({"stage": description, "seconds": round(time.perf_counter() - start, 2)})

    def pass_done(self, record, seconds: float) -> None:
        pass


def timed_build(source: Path, target: str, out: Path, inputs: Path, precision: str, calib: Path | None = None,
                value_range: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Build in a child process; its stage times, total wall and CPU seconds, peak RSS and verdict."""
    command = [sys.executable, "-m", "edgec.bench.timing", str(source), target, str(out), "--inputs", str(inputs),
               "--precision", precision, f"--range={value_range[0]},{value_range[1]}"]  # "=": ranges may start with "-"
    if calib is not None:
        command += ["--calib", str(calib)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            last = (errors.read().strip().splitlines() or ["(no message)"])[-1]
            return {"passed": False, "error": f"the build process failed: {last}", "wall_seconds": round(wall, 2)}
    row = json.loads(output.strip().splitlines()[-1])
    return {**row, "startup_seconds": round(wall - row["build_seconds"], 2), "wall_seconds": round(wall, 2),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def _build(args: argparse.Namespace) -> dict:
    from edgec.build import BuildOptions, build
    from edgec.errors import EdgecError
    from edgec.images import ImagePreprocess

    low, high = (float(v) for v in args.range.split(","))
    options = BuildOptions(inputs=args.inputs, precision=args.precision, calib=args.calib, images=ImagePreprocess((low, high)))
    progress = StageTimes()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = build(args.source, args.target, args.out, options, progress)
        verdict = {"passed": result.verification.passed, "shipped": result.report["precision"],
                   "min_cosine": round(min(o.cosine for o in result.verification.outputs), 6)}
    except EdgecError as exc:
        verdict = {"passed": False, "error": str(exc)}
    return {"stages": progress.stages, "build_seconds": round(time.perf_counter() - start, 2), **verdict}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One build, timed stage by stage (JSON on stdout).")
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("out")
    parser.add_argument("--inputs")
    parser.add_argument("--calib")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--range", default="0,1")
    print(json.dumps(_build(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
