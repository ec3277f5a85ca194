"""ONNX Runtime runner for ``.onnx`` and ``.ort`` files (CPU execution provider)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from edgec.errors import ModelLoadError
from edgec.runtime.base import Runner, TensorSpec

# ONNX Runtime names element types as strings; map them to numpy.
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

GRAPH_OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(threads: int, optimization: str = "all") -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    return options


class OrtRunner(Runner):
    runtime = "onnxruntime"
    thread_safe = True  # InferenceSession.run is

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int = 1, optimization: str = "all",
                 profile_prefix: str | None = None):
        """``profile_prefix``: turn on ORT's profiler, which writes its trace to
        ``<profile_prefix>_<date>.json`` when ``session.end_profiling()`` is called."""
        source = model if isinstance(model, bytes) else str(model)
        options = session_options(threads, optimization)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ModelLoadError(
                f"ONNX Runtime cannot load the model: {str(exc).strip().splitlines()[0]}",
                hint="Check that it was built for this ONNX Runtime version and machine.",
            ) from exc
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


def _spec(arg) -> TensorSpec:
    if arg.type not in _ORT_DTYPES:
        raise ModelLoadError(
            f"Model input/output '{arg.name}' has type {arg.type}, which edgec cannot feed or compare.",
            hint=f"Supported element types: {', '.join(sorted(_ORT_DTYPES))}.",
        )
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(arg.name, shape, np.dtype(_ORT_DTYPES[arg.type]))
