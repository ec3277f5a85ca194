"""Time one model file on the device this script runs on; print one JSON object.

edgec copies this file beside an artifact onto a device (an SSH board, an emulated arm64
core, or this machine) and runs it with the device's own Python, so it must not import
edgec: it needs only the standard library, numpy, and the artifact's runtime (onnxruntime
for ``.onnx``/``.ort``, ai-edge-litert with its default XNNPACK delegate for ``.tflite``)::

    python3 device_runner.py model.tflite --warmup 10 --runs 50 --threads 4 --seed 0

On success stdout holds one JSON object with ``runtime``, ``load_ms``, ``first_run_ms``,
``latency_ms``, ``peak_memory_mb``, ``memory``, ``arch``, ``cpu`` and ``count`` (the keys
of edgec's measurement this side can know, timed as edgec's local profiler times them;
edgec adds the artifact and device blocks). Anything the runtimes print goes to
stderr. On failure stdout holds ``{"error": REASON, "message": ...}``, the message also goes
to stderr, and the exit status is 2 (bad artifact), 3 (runtime missing) or 124 (timeout).

``--count-marker`` is for instruction counting under qemu: after the timed runs, it runs the
model again with no timer in the loop and marks the instruction count after ``N1`` and
after ``N2`` of those runs by calling close() on a descriptor that cannot exist
(MARKER_FD), which edgec's qemu plugin watches for. Per-inference cost is then
(count at N2 - count at N1) / (N2 - N1). Off qemu the marks are harmless failed closes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import sys
import threading
import time

# What edgec's own environment pins (constraints.txt); instruction counts change with versions.
# Module to import and pinned package, per need.
REQUIREMENTS = {"numpy": ("numpy", "numpy==1.26.4"), "onnxruntime": ("onnxruntime", "onnxruntime==1.23.0"),
                "litert": ("ai_edge_litert.interpreter", "ai-edge-litert==2.1.0")}
RUNTIME_OF_SUFFIX = {".onnx": "onnxruntime", ".ort": "onnxruntime", ".tflite": "litert"}
MARKER_FD = 0x7EDC0DE  # far above any descriptor limit; must match insn_count.c
EXIT_BAD_ARTIFACT, EXIT_RUNTIME_MISSING, EXIT_TIMEOUT = 2, 3, 124


class Failure(Exception):
    def __init__(self, reason: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.reason, self.message, self.exit_code = reason, message, exit_code


def require(need: str) -> None:
    """Import what ``need`` names, or fail saying which pinned package the device lacks."""
    module, requirement = REQUIREMENTS[need]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        package = requirement.split("==")[0]
        raise Failure("runtime_missing", f"device lacks {package}: pip install {requirement} ({exc})",
                      EXIT_RUNTIME_MISSING) from exc


class OrtModel:
    """An ONNX Runtime session on the CPU, as edgec's own ORT runner configures it."""

    name = "onnxruntime"

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.version = ort.__version__
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                 "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
                 "tensor(int64)": "int64", "tensor(bool)": "bool"}
        self.inputs = [(i.name, i.shape, types.get(i.type, i.type)) for i in self.session.get_inputs()]

    def run(self, feeds: dict) -> None:
        self.session.run(None, feeds)


class LiteRtModel:
    """A LiteRT interpreter with its default delegate (XNNPACK), as deployed."""

    name = "litert"

    def __init__(self, path: str, threads: int) -> None:
        from importlib.metadata import version

        from ai_edge_litert.interpreter import Interpreter

        self.version = version("ai-edge-litert")
        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        details = self.interpreter.get_input_details()
        self.inputs = [(d["name"], [int(n) for n in d["shape"]], d["dtype"].__name__) for d in details]
        self._input_index = {d["name"]: d["index"] for d in details}
        self._output_index = [d["index"] for d in self.interpreter.get_output_details()]

    def run(self, feeds: dict) -> None:
        for name, array in feeds.items():
            self.interpreter.set_tensor(self._input_index[name], array)
        self.interpreter.invoke()
        for index in self._output_index:
            self.interpreter.get_tensor(index)


MODEL_OF_RUNTIME = {"onnxruntime": OrtModel, "litert": LiteRtModel}


def runtime_for(path: str) -> str:
    """The artifact's runtime, imported (so that loading the model is timed without it)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in RUNTIME_OF_SUFFIX:
        raise Failure("bad_artifact", f"{path}: not a model file this runner knows "
                      f"({', '.join(RUNTIME_OF_SUFFIX)})", EXIT_BAD_ARTIFACT)
    if not os.path.isfile(path):
        raise Failure("bad_artifact", f"{path}: no such file", EXIT_BAD_ARTIFACT)
    runtime = RUNTIME_OF_SUFFIX[suffix]
    require("numpy")
    require(runtime)
    return runtime


def load(path: str, runtime: str, threads: int):
    try:
        return MODEL_OF_RUNTIME[runtime](path, threads)
    except Exception as exc:  # the runtimes raise their own types for unreadable files
        raise Failure("bad_artifact", f"{path}: the runtime cannot load it: {exc}", EXIT_BAD_ARTIFACT) from exc


def random_feeds(inputs: list, seed: int) -> dict:
    """Seeded standard-normal floats, integers in [0, 2) and random booleans, as edgec's
    verification draws them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in inputs:
        if not all(isinstance(d, int) and d > 0 for d in shape):
            raise Failure("bad_artifact", f"input '{name}' has a dynamic shape {shape}; "
                          "build the artifact with --input-shape", EXIT_BAD_ARTIFACT)
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.random(shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def time_runs(model, feeds: dict, warmup: int, runs: int, budget_s: float | None) -> tuple[float, dict]:
    """The first run's time, apart; then, after the rest of ``warmup`` (which counts the
    first run), ``runs`` timed runs or as many as fit in ``budget_s`` (at least 3)."""
    start = time.perf_counter()
    model.run(feeds)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup - 1):
        model.run(feeds)
    latency = {"warmup": warmup, **summary(timed_samples(model, feeds, runs, budget_s))}
    if budget_s is not None:
        latency["budget_s"] = budget_s
    return first_ms, latency


def timed_samples(model, feeds: dict, runs: int, budget_s: float | None = None) -> list[float]:
    """Milliseconds of ``runs`` runs of ``model`` (anything with ``run(feeds)``), or of as
    many as fit in ``budget_s`` (at least 3)."""
    times = []
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    while len(times) < runs and (deadline is None or time.perf_counter() < deadline or len(times) < 3):
        start = time.perf_counter()
        model.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(samples_ms: list[float]) -> dict:
    """The ``latency_ms`` statistics of edgec's measurement, with every sample in order."""
    import numpy as np

    t = np.asarray(samples_ms, dtype=np.float64)
    return {"runs": len(t), "min": float(t.min()), "median": float(np.median(t)), "mean": float(t.mean()),
            "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99)), "std": float(t.std()),
            "samples": [float(v) for v in t]}


@contextlib.contextmanager
def pinned(threads: int):
    """Pin this process to ``threads`` CPUs so timings do not migrate between cores; yields
    the CPUs, or None where the OS cannot pin or there are no more CPUs than threads."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    if threads >= len(allowed):
        yield None
        return
    os.sched_setaffinity(0, allowed[:threads])
    try:
        yield allowed[:threads]
    finally:
        os.sched_setaffinity(0, allowed)


class PeakMemory:
    """Peak resident set size while the block runs: Linux's high-water mark (VmHWM), reset
    through /proc/self/clear_refs before loading so earlier imports do not count; elsewhere
    the lifetime peak (getrusage), and ``method`` says which."""

    def __enter__(self) -> PeakMemory:
        self.baseline_mb = _status_mb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.method = "VmHWM of /proc/self/status, reset via /proc/self/clear_refs before loading"
        except OSError:
            self.method = "getrusage ru_maxrss: peak of the whole process lifetime"
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_mb("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is not None:
            self.peak_mb = hwm
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            self.peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10

    def to_dict(self) -> dict:
        return {"peak_rss_mb": self.peak_mb, "rss_before_load_mb": self.baseline_mb, "method": self.method}


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's name as /proc/cpuinfo gives it (x86 only: ARM kernels list part numbers)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def mark() -> None:
    try:
        os.close(MARKER_FD)
    except OSError:
        pass


def counted_runs(model, feeds: dict, n1: int, n2: int) -> dict:
    """Runs with the instruction count marked after ``n1`` and ``n2`` runs; no timer inside."""
    for _ in range(n1):
        model.run(feeds)
    mark()
    for _ in range(n2 - n1):
        model.run(feeds)
    mark()
    return {"n1": n1, "n2": n2}


def profile(args: argparse.Namespace) -> dict:
    runtime = runtime_for(args.artifact)
    with pinned(args.threads) as cpus, PeakMemory() as memory:
        start = time.perf_counter()
        model = load(args.artifact, runtime, args.threads)
        load_ms = (time.perf_counter() - start) * 1e3
        feeds = random_feeds(model.inputs, args.seed)
        first_run_ms, latency = time_runs(model, feeds, args.warmup, args.runs, args.budget_s)
        count = counted_runs(model, feeds, *args.count_runs) if args.count_marker else None
    return {"runtime": {"name": model.name, "version": model.version, "threads": args.threads, "pinned_cpus": cpus},
            "load_ms": load_ms, "first_run_ms": first_run_ms, "latency_ms": latency,
            "peak_memory_mb": memory.peak_mb, "memory": memory.to_dict(),
            "arch": platform.machine(), "cpu": cpu_model(), "count": count}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count-marker", action="store_true", help="mark instruction counts for qemu")
    parser.add_argument("--count-runs", type=int, nargs=2, default=(1, 6), metavar=("N1", "N2"))
    parser.add_argument("--timeout-s", type=float, default=None, help="give up (exit 124) after this long")
    args = parser.parse_args(argv)
    if not 0 <= args.count_runs[0] < args.count_runs[1]:
        parser.error("--count-runs needs 0 <= N1 < N2")
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs and --threads must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the runtimes print goes to stderr; stdout carries only the result
    if args.timeout_s is not None:
        timer = threading.Timer(args.timeout_s, give_up, (result_fd, args.timeout_s))
        timer.daemon = True
        timer.start()
    try:
        result, status = profile(args), 0
    except Failure as failure:
        result, status = {"error": failure.reason, "message": failure.message}, failure.exit_code
        print(failure.message, file=sys.stderr)
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    return status


def give_up(result_fd: int, timeout_s: float) -> None:
    """Stop even inside a runtime's native code, so a device never keeps a stray process."""
    message = f"gave up after {timeout_s:g} s"
    print(message, file=sys.stderr, flush=True)
    os.write(result_fd, (json.dumps({"error": "timeout", "message": message}) + "\n").encode())
    os._exit(EXIT_TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
