"""Per-op times of a ``.tflite`` from LiteRT's own profiler, through its C API.

LiteRT's Python ``Interpreter`` has no profiler, and TFLite's ``benchmark_model`` ships in
no package registry. ai-edge-litert's ``libLiteRt.so`` exports the C API of LiteRT's
CompiledModel, whose runtime options turn on the same op profiler benchmark_model uses; this
module drives it with ctypes. The C structs below are those of LiteRT v2.1.0
(litert/c/litert_profiler_event.h), so other versions are refused rather than misread.

With XNNPACK (the CPU default) a TFLite graph becomes one or a few delegate nodes; the
profiler then reports XNNPACK's own operators inside them (e.g. "Convolution (NHWC, F32)
IGEMM", which may be a Conv2D with its fused activation), and ops XNNPACK did not take
under their TFLite names. That is the breakdown edgec reports: where time goes as the
runtime really executes the model, not one row per TFLite op.
"""

from __future__ import annotations

import ctypes
import os
from importlib import metadata
from pathlib import Path
from typing import Self

import numpy as np

from edgec.profile.ops import Profiled, ProfiledRun
from edgec.profile.xnnpack_rows import RowLabels
from edgec.quiet import captured_stderr

ABI_VERSION = "2.1.0"
_HW_CPU = 1
_LOCK_WRITE = 1
_FLOAT32 = 1  # kLiteRtElementTypeFloat32 (= kTfLiteFloat32)
# LiteRtProfilerEventType values: DEFAULT (e.g. a whole "Invoke"), and those that are op invocations.
_DEFAULT = 1
_OPERATOR = 1 << 1
_DELEGATE_OPERATOR = 1 << 2
_DELEGATE_PROFILED_OPERATOR = 1 << 3
_OP_EVENTS = (_OPERATOR, _DELEGATE_OPERATOR, _DELEGATE_PROFILED_OPERATOR)
_BUFFER_EVENTS = 2048  # the CompiledModel profiler's buffer (compiled_model.cc); events beyond are dropped


class ProfilerUnavailable(RuntimeError):
    """This LiteRT cannot profile ops here (another version, or its C API refused)."""


class _MemoryUsage(ctypes.Structure):
    _fields_ = [("total_allocated_bytes", ctypes.c_size_t), ("in_use_allocated_bytes", ctypes.c_size_t),
                ("private_footprint_bytes", ctypes.c_size_t)]


class _Event(ctypes.Structure):
    """ProfiledEventData of litert_profiler_event.h (v2.1.0)."""

    _fields_ = [("tag", ctypes.c_char_p), ("event_type", ctypes.c_int), ("start_timestamp_us", ctypes.c_uint64),
                ("elapsed_time_us", ctypes.c_uint64), ("begin_mem_usage", _MemoryUsage), ("end_mem_usage", _MemoryUsage),
                ("event_metadata1", ctypes.c_uint64), ("event_metadata2", ctypes.c_uint64), ("event_source", ctypes.c_int)]


def profile_litert(path: Path, threads: int, runs: int, warmup: int, seed: int = 0) -> Profiled:
    """Op times of ``runs`` inferences on seeded random inputs, after ``warmup`` ones."""
    version = metadata.version("ai-edge-litert")
    if version != ABI_VERSION:
        raise ProfilerUnavailable(f"op profiling reads LiteRT {ABI_VERSION}'s C structs; ai-edge-litert {version} is installed")
    with captured_stderr(), _CompiledModel(path, threads) as model:  # LiteRT logs its accelerator set-up
        model.fill_inputs(np.random.default_rng(seed))
        for _ in range(warmup):
            model.run()
        events = model.profile(runs)
    return Profiled(_runs(events, RowLabels(path.read_bytes())), "LiteRT profiler (CompiledModel API with runtime option enable_profiling, "
                    "XNNPACK on CPU): time per executed operator", _NOTE)


_NOTE = ("XNNPACK runs most of a TFLite graph as delegate nodes; its profile rows are XNNPACK's own operators (one may "
         "cover a TFLite op with its fused activation). Each row is named after the source nodes of the TFLite op it "
         "runs (the op's tensor name for a .tflite edgec did not build) where XNNPACK's operators align with the TFLite "
         "ops in only one way; rows that do not keep XNNPACK's name, '#n' their position in the run, marked '(unmapped)'. "
         "Timed on seeded random inputs through LiteRT's CompiledModel API; each op time is whole "
         "microseconds, so ops far below 1 us round down.")


def _runs(events: list[tuple[str, int, int, int]], labels: RowLabels) -> list[ProfiledRun]:
    """Group ``(tag, type, metadata1, elapsed_us)`` events into runs: each run's "Invoke"
    event comes first and its ops follow (XNNPACK's carry no timestamps, only their order).
    A delegate node's own event is dropped when the delegate reported the operators inside
    it, else it would count twice. Rows are named by their position in the run (``labels``)."""
    inner = any(kind in (_DELEGATE_OPERATOR, _DELEGATE_PROFILED_OPERATOR) for _, kind, _, _ in events)
    runs: list[list[tuple[str, int]]] = []
    walls: list[int] = []
    for tag, kind, _, elapsed in events:
        if kind == _DEFAULT and tag == "Invoke":
            runs.append([])
            walls.append(elapsed)
        elif runs and kind in _OP_EVENTS and not (inner and kind == _OPERATOR and "delegate" in tag.lower()):
            runs[-1].append((tag, elapsed))
    profiled = []
    for wall, rows in zip(walls, runs):
        run = ProfiledRun(wall)
        for node, (tag, elapsed) in zip(labels.of([tag for tag, _ in rows]), rows):
            run.add(node, tag, elapsed)
        profiled.append(run)
    return profiled


class _CompiledModel:
    """A LiteRT CompiledModel on the CPU with profiling on, and its I/O buffers (signature 0)."""

    def __init__(self, path: Path, threads: int):
        import ai_edge_litert

        self.lib = ctypes.CDLL(os.path.join(os.path.dirname(ai_edge_litert.__file__), "libLiteRt.so"))
        self.path = path
        self.threads = threads
        self._handles: list[tuple[str, ctypes.c_void_p]] = []

    def __enter__(self) -> Self:
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        self.env = self._new("LiteRtCreateEnvironment", ctypes.c_int(0), None, destroy="LiteRtDestroyEnvironment")
        self.model = self._new("LiteRtCreateModelFromFile", str(self.path).encode(), destroy="LiteRtDestroyModel")
        options = self._new("LiteRtCreateOptions", destroy="LiteRtDestroyOptions")
        self._call("LiteRtSetOptionsHardwareAccelerators", options, ctypes.c_int(_HW_CPU))
        runtime = self._opaque(options, "Runtime")
        self._call("LiteRtSetRuntimeOptionsEnableProfiling", runtime, ctypes.c_bool(True))
        cpu = self._opaque(options, "Cpu")
        self._call("LiteRtSetCpuOptionsNumThread", cpu, ctypes.c_int(self.threads))
        self.compiled = self._new("LiteRtCreateCompiledModel", self.env, self.model, options, destroy="LiteRtDestroyCompiledModel")
        self.signature = self._out("LiteRtGetModelSignature", self.model, ctypes.c_size_t(0))
        self.inputs = self._buffers("Input")
        self.outputs = self._buffers("Output")
        self.profiler = self._out("LiteRtCompiledModelGetProfiler", self.compiled)

    def __exit__(self, *exc) -> None:
        for destroy, handle in reversed(self._handles):
            getattr(self.lib, destroy)(handle)
        self._handles.clear()

    def _call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise ProfilerUnavailable(f"LiteRT's {name} failed (status {status}) on {self.path.name}")

    def _out(self, name: str, *args) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        self._call(name, *args, ctypes.byref(handle))
        return handle

    def _new(self, name: str, *args, destroy: str) -> ctypes.c_void_p:
        handle = self._out(name, *args)
        self._handles.append((destroy, handle))
        return handle

    def _opaque(self, options: ctypes.c_void_p, kind: str) -> ctypes.c_void_p:
        """Create ``kind`` options (Runtime, Cpu), attach them to ``options``, return their handle."""
        opaque = self._out(f"LiteRtCreate{kind}Options")
        self._call("LiteRtAddOpaqueOptions", options, opaque)  # options now own it
        return self._out(f"LiteRtFind{kind}Options", opaque)

    def _buffers(self, kind: str) -> ctypes.Array:
        count = ctypes.c_size_t()
        self._call(f"LiteRtGetNumSignature{kind}s", self.signature, ctypes.byref(count))
        buffers = (ctypes.c_void_p * count.value)()
        for i in range(count.value):
            tensor = self._out(f"LiteRtGetSignature{kind}TensorByIndex", self.signature, ctypes.c_size_t(i))
            tensor_type = ctypes.create_string_buffer(256)  # LiteRtRankedTensorType, passed through untouched
            self._call("LiteRtGetRankedTensorType", tensor, tensor_type)
            requirements = self._out(f"LiteRtGetCompiledModel{kind}BufferRequirements", self.compiled, ctypes.c_size_t(0), ctypes.c_size_t(i))
            buffers[i] = self._new("LiteRtCreateManagedTensorBufferFromRequirements", self.env, tensor_type, requirements,
                                   destroy="LiteRtDestroyTensorBuffer")
        return buffers

    def fill_inputs(self, rng: np.random.Generator) -> None:
        """Standard-normal floats; zeros for integer inputs (random ids could index out of range)."""
        for buffer in self.inputs:
            size = ctypes.c_size_t()
            self._call("LiteRtGetTensorBufferSize", ctypes.c_void_p(buffer), ctypes.byref(size))
            element_type = ctypes.c_int()
            tensor_type = ctypes.create_string_buffer(256)
            self._call("LiteRtGetTensorBufferTensorType", ctypes.c_void_p(buffer), tensor_type)
            ctypes.memmove(ctypes.byref(element_type), tensor_type, ctypes.sizeof(element_type))
            data = (rng.standard_normal(size.value // 4).astype(np.float32).tobytes() if element_type.value == _FLOAT32
                    else bytes(size.value))
            ctypes.memmove(self._lock(buffer), data, len(data))
            self._call("LiteRtUnlockTensorBuffer", ctypes.c_void_p(buffer))

    def _lock(self, buffer: int) -> ctypes.c_void_p:
        address = ctypes.c_void_p()
        self._call("LiteRtLockTensorBuffer", ctypes.c_void_p(buffer), ctypes.byref(address), ctypes.c_int(_LOCK_WRITE))
        return address

    def run(self) -> None:
        self._call("LiteRtRunCompiledModel", self.compiled, ctypes.c_size_t(0), ctypes.c_size_t(len(self.inputs)), self.inputs,
                   ctypes.c_size_t(len(self.outputs)), self.outputs)

    def profile(self, runs: int) -> list[tuple[str, int, int, int]]:
        """``(tag, event type, metadata1, elapsed us)`` of every event in ``runs`` runs, read in
        batches small enough for the profiler's fixed-size buffer."""
        events = self._profiled(1)
        batch = max(1, _BUFFER_EVENTS // (2 * max(len(events), 1)))
        remaining = runs - 1
        while remaining > 0:
            events += self._profiled(min(batch, remaining))
            remaining -= min(batch, remaining)
        return events

    def _profiled(self, runs: int) -> list[tuple[str, int, int, int]]:
        self._call("LiteRtResetProfiler", self.profiler)
        self._call("LiteRtStartProfiler", self.profiler)
        for _ in range(runs):
            self.run()
        self._call("LiteRtStopProfiler", self.profiler)
        count = ctypes.c_int()
        self._call("LiteRtGetNumProfilerEvents", self.profiler, ctypes.byref(count))
        events = (_Event * count.value)()
        self._call("LiteRtGetProfilerEvents", self.profiler, count, events)
        return [(e.tag.decode(errors="replace") if e.tag else "?", e.event_type, e.event_metadata1, e.elapsed_time_us) for e in events]
