"""``make bench``: build every zoo model for every target and time it, writing JSON.

For each model × target: build time, artifact sizes, and single-thread latency of the
source model in ONNX Runtime next to the artifact in its own runtime, measured in the same
process on the same input, so the ratio is meaningful even on a noisy machine. Everything
runs on this host: ``measured_on`` says which architecture that is (ARM targets' artifacts
run here too, which proves they load and compute; their ARM speed is the profiler's job).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from edgec.build import BuildOptions, build
from edgec.profile import measure
from edgec.report import versions
from edgec.runtime import open_runner
from edgec.runtime.ort import OrtRunner
from edgec.targets import known_targets
from edgec.verify import load_inputs, random_inputs

REPO = Path(__file__).resolve().parent.parent


def _one_input(runner, entry):
    if entry.get("eval_data"):
        return load_inputs(REPO / entry["eval_data"], runner.inputs, limit=1).batches[0]
    return random_inputs(runner.inputs, count=1).batches[0]


def bench_model(entry: dict, target: str, runs: int) -> dict:
    source_path = REPO / "models" / entry["file"]
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        start = time.perf_counter()
        result = build(source_path, target, tmp, BuildOptions(max_samples=8, inputs=None))
        build_s = time.perf_counter() - start
        artifact = open_runner(result.artifacts[0], threads=1, options=result.report["target"]["runtime"])
        source = OrtRunner(source_path, threads=1, optimization="all")
        feeds = _one_input(artifact, entry)
        source_stats = measure(source, feeds, runs=runs)
        artifact_stats = measure(artifact, feeds, runs=runs)
        return {
            "model": entry["name"],
            "target": target,
            "build_seconds": round(build_s, 2),
            "artifacts": {p.name: p.stat().st_size for p in result.artifacts},
            "source_size_bytes": source_path.stat().st_size,
            "max_relative_error": max(o.relative_error for o in result.verification.outputs),
            "latency_ms": {"source_onnxruntime": source_stats.to_dict(), "artifact": artifact_stats.to_dict()},
            "speedup_vs_source": round(source_stats.median_ms / artifact_stats.median_ms, 3),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build and time every zoo model for every target.")
    parser.add_argument("-o", "--output", default="build/bench.json")
    parser.add_argument("--models", nargs="*", help="zoo model names (default: all)")
    parser.add_argument("--targets", nargs="*", default=known_targets())
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    zoo = json.loads((REPO / "models" / "zoo.json").read_text())
    chosen = [e for e in zoo if not args.models or e["name"] in args.models]
    results = []
    for entry in chosen:
        for target in args.targets:
            row = bench_model(entry, target, args.runs)
            results.append(row)
            print(f"{row['model']:20s} {target:11s} build {row['build_seconds']:6.1f} s   source "
                  f"{row['latency_ms']['source_onnxruntime']['median_ms']:7.3f} ms   artifact "
                  f"{row['latency_ms']['artifact']['median_ms']:7.3f} ms", flush=True)
    report = {"measured_on": platform.machine(), "threads": 1, "versions": versions(), "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
