"""ONNX Runtime runner for ``.onnx`` and ``.ort`` files (CPU execution provider)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Mapping

import numpy as np
import onnxruntime as ort

from edgec.errors import ModelCheckError, ModelLoadError
from edgec.runtime import isolated
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

# "Non-zero status code returned while running Conv node. Name:'conv0' Status Message: ..."
_NODE_FAILED = re.compile(r"running (\w+) node\. Name:'([^']*)' Status Message: (.*)")
_NO_KERNEL = re.compile(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_UNKNOWN_OP = re.compile(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")
MISSING_OP_HINT = "Replace the operator in the exporter, or export with a different opset."
# ORT logs a failed node at error severity before raising it; the raised error says the same.
_FATAL_ONLY = 4

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
    options.log_severity_level = _FATAL_ONLY
    return options


class OrtRunner(Runner):
    runtime = "onnxruntime"
    thread_safe = True  # InferenceSession.run is

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int = 1, optimization: str = "all",
                 profile_prefix: str | None = None, user_file: str | None = None):
        """``profile_prefix``: turn on ORT's profiler, which writes its trace to
        ``<profile_prefix>_<date>.json`` when ``session.end_profiling()`` is called.
        ``user_file``: the model is this file of the user's, so a node ORT cannot run is the
        model's fault (an ``EdgecError``); otherwise it is edgec's own and ORT's error goes on,
        also when ORT refuses to load model bytes edgec made (a file on disk may be anyone's)."""
        self.user_file = user_file
        self._model, self._threads, self._optimization = model, threads, optimization
        source = model if isinstance(model, bytes) else str(model)
        options = session_options(threads, optimization)
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            if user_file is None and isinstance(model, bytes) and missing_op(exc, _nodes(model)) is None:
                raise  # a model edgec made in memory (a pass's, a capture's): edgec's bug, not the user's file
            raise _load_error(exc, model, f"'{user_file}'" if user_file else "the model") from exc
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]

    def reordered(self) -> OrtRunner:
        """Graph optimizations on where they were off (and off where on): fused kernels sum in
        another order."""
        other = "disabled" if self._optimization != "disabled" else "all"
        return OrtRunner(self._model, self._threads, other, user_file=self.user_file)

    def crash_signal(self, feeds: Mapping[str, np.ndarray]) -> signal.Signals | None:
        """The signal that ends ONNX Runtime running this model on ``feeds`` in a child
        process, or None (``edgec.runtime.isolated``): a crash here would end edgec."""
        model = self._model if isinstance(self._model, bytes) else str(self._model)
        return isolated.crash_signal(model, feeds, self._optimization)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        try:
            return dict(zip(names, self.session.run(names, feeds)))
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
            if self.user_file is None:
                raise
            raise _invalid_model(exc, self.user_file) from exc


def _load_error(exc: Exception, model: str | os.PathLike[str] | bytes, what: str) -> ModelLoadError:
    missing = missing_op(exc, _nodes(model))
    if missing:
        op, node, reason = missing
        return ModelLoadError(f"Cannot load {what}: {reason} (node '{node}'); edgec runs source models in ONNX "
                              "Runtime to verify artifacts against them.", hint=MISSING_OP_HINT)
    return ModelLoadError(
        f"ONNX Runtime cannot load {what}: {str(exc).strip().splitlines()[0]}",
        hint="Check that it was built for this ONNX Runtime version and machine.",
    )


def missing_op(exc: Exception, nodes: Iterable) -> tuple[str, str, str] | None:
    """(op type, node name, reason) when ORT's session error is an op it has no CPU kernel
    for or does not know at all; ``nodes`` (ONNX or IR nodes) name the node in the latter case."""
    match = _NO_KERNEL.search(str(exc))
    if match:
        op, version, node = match.groups()
        return op, node, f"ONNX Runtime's CPU provider has no kernel for {op} at opset {version}"
    match = _UNKNOWN_OP.search(str(exc))
    if match:
        domain, op, _ = match.groups()
        node = next((n.name for n in nodes if n.op_type == op and n.domain == domain), "?")
        return op, node, f"ONNX Runtime does not know the op {domain + '::' if domain else ''}{op}"
    return None


def _nodes(model: str | os.PathLike[str] | bytes) -> list:
    """The graph's nodes, to name one in an error; none if the file is not ONNX (.ort)."""
    import onnx  # only errors need it; the isolated run's child process starts faster without it

    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    except Exception:  # any file ORT refused: nothing more to say about it
        return []
    return list(proto.graph.node)


def _invalid_model(exc: Exception, file: str) -> ModelCheckError:
    """ORT's reason a node of the user's model failed, as the model's error."""
    text = " ".join(str(exc).split())
    match = _NODE_FAILED.search(text)
    where, reason = (f"node '{match[2]}' ({match[1]})", match[3]) if match else ("the model", text)
    return ModelCheckError(
        f"ONNX Runtime cannot run {where} of '{file}': {reason.rstrip('.')}. The model passes the ONNX checker "
        "but is invalid (an attribute or input shape the op does not accept).",
        hint="Fix the node in the exporter or the model, then build again.",
    )


def _spec(arg) -> TensorSpec:
    if arg.type not in _ORT_DTYPES:
        raise ModelLoadError(
            f"Model input/output '{arg.name}' has type {arg.type}, which edgec cannot feed or compare.",
            hint=f"Supported element types: {', '.join(sorted(_ORT_DTYPES))}.",
        )
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(arg.name, shape, np.dtype(_ORT_DTYPES[arg.type]))
