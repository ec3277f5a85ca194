"""LiteRT (TensorFlow Lite) runner for ``.tflite`` files.

edgec stores, inside each ``.tflite`` it writes, a small JSON metadata entry (``edgec.io``)
mapping every source input/output name to the TFLite signature key and the axis
permutation between the two layouts (``tflite = source.transpose(perm)``). The runner uses
it to accept and return arrays in the source model's layout. A ``.tflite`` from elsewhere
(no such entry) is run as it is, with its own names and layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as tfl_schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from edgec.errors import ModelLoadError
from edgec.quiet import captured_stderr
from edgec.runtime.base import Runner, TensorSpec

IO_METADATA = "edgec.io"
OP_NODES_METADATA = "edgec.op_nodes"  # per TFLite operator, the source (ONNX) nodes it computes


def read_metadata(content: bytes, name: str) -> bytes | None:
    """The bytes of a named metadata entry of a .tflite flatbuffer, or None."""
    model = tfl_schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == name:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


class LiteRTRunner(Runner):
    runtime = "litert"

    def __init__(self, model: str | os.PathLike[str] | bytes, threads: int = 1, xnnpack: bool = True,
                 io: dict[str, Any] | None = None):
        """``io``: the ``edgec.io`` mapping, for a file that does not carry it (yet)."""
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with captured_stderr() as log:
            try:
                self.interpreter = Interpreter(
                    model_content=content, num_threads=threads, experimental_op_resolver_type=resolver
                )
                self.interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                detail = " ".join(log.read().split()) or str(exc).strip().splitlines()[0]
                raise ModelLoadError(
                    f"LiteRT cannot load the model: {detail}",
                    hint="Check that the file is a complete .tflite flatbuffer built for this LiteRT version.",
                ) from exc
        self._bind(io if io is not None else json.loads(read_metadata(content, IO_METADATA) or b"null"))

    def placement(self) -> dict[str, Any]:
        """How the runtime placed the graph: delegate (XNNPACK) partitions, and the ops left
        outside them by op type (run by TFLite's reference kernels, between partitions)."""
        ops = self.interpreter._get_ops_details()  # the only API that shows delegation
        delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
        outside: dict[str, int] = {}
        for op in _outside_delegates(ops, delegates, {d["index"] for d in self.interpreter.get_output_details()}):
            outside[op["op_name"]] = outside.get(op["op_name"], 0) + 1
        return {"delegate_partitions": len(delegates), "outside_delegate": dict(sorted(outside.items()))}

    def _bind(self, io_map: dict | None) -> None:
        """Pair source names with TFLite tensor indices and layout permutations."""
        in_details, out_details = self._details()
        if io_map is None:
            io_map = {
                "inputs": [{"name": k, "key": k} for k in in_details],
                "outputs": [{"name": k, "key": k} for k in out_details],
            }
        self._in = [_Binding(e, in_details[e["key"]]) for e in io_map["inputs"]]
        self._out = [_Binding(e, out_details[e["key"]]) for e in io_map["outputs"]]
        self.inputs = [b.spec for b in self._in]
        self.outputs = [b.spec for b in self._out]

    def _details(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """Input/output tensor details keyed by signature key, or by tensor name for files
        written without a signature (older converters, e.g. MediaPipe's models)."""
        if self.interpreter.get_signature_list():
            signature = self.interpreter.get_signature_runner()
            return signature.get_input_details(), signature.get_output_details()
        return ({d["name"]: d for d in self.interpreter.get_input_details()},
                {d["name"]: d for d in self.interpreter.get_output_details()})

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for b in self._in:
            self.interpreter.set_tensor(b.index, b.quantize(np.ascontiguousarray(feeds[b.name].transpose(b.perm))))
        self.interpreter.invoke()
        return {b.name: b.dequantize(b.read(self.interpreter)).transpose(b.inverse) for b in self._out}


class _Binding:
    """One tensor: source name, TFLite tensor index, the permutation between layouts and,
    for edgec's int8-I/O models, the quantization that maps it to the source's float values."""

    def __init__(self, entry: dict, details: dict):
        self.name = entry["name"]
        self.index = details["index"]
        native_shape = self.native_shape = tuple(int(d) for d in details["shape"])
        self.perm = tuple(entry.get("perm", range(len(native_shape))))
        self.inverse = tuple(int(i) for i in np.argsort(self.perm))
        source_shape = tuple(native_shape[i] for i in self.inverse)
        self.native_dtype = np.dtype(details["dtype"])
        self.scale, self.zero_point = details["quantization"]
        # Only edgec's own files (with a perm entry) promise float semantics at the boundary.
        self.quantized = "perm" in entry and self.native_dtype.kind in "iu" and self.scale > 0
        dtype = np.dtype(np.float32) if self.quantized else self.native_dtype
        self.spec = TensorSpec(self.name, source_shape, dtype)

    def read(self, interpreter: Interpreter) -> np.ndarray:
        """The tensor's value. LiteRT hands out no tensor without elements (a Split into
        zero-size parts): "Invalid tensor size", as its data pointer is null."""
        if 0 in self.native_shape:
            return np.zeros(self.native_shape, self.native_dtype)
        return interpreter.get_tensor(self.index)

    def quantize(self, array: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return array
        info = np.iinfo(self.native_dtype)
        q = np.round(array / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.native_dtype)

    def dequantize(self, array: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return array
        return ((array.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


def _outside_delegates(ops: list[dict], delegates: list[dict], graph_outputs: set[int]) -> list[dict]:
    """The original ops a delegate did not take.

    LiteRT lists the replaced ops beside the DELEGATE nodes, so they are told apart by data
    flow: an op outside every partition produces a tensor no delegate produces, which a
    delegate, the graph's outputs or another outside op reads. (Ops inside a partition
    produce either partition outputs or tensors nothing outside the partition sees.)
    """
    originals = [op for op in ops if op["op_name"] != "DELEGATE"]
    if not delegates:
        return originals
    produced = {int(t) for op in delegates for t in op["outputs"]}
    read = {int(t) for op in delegates for t in op["inputs"]} | graph_outputs
    outside: dict[int, dict] = {}
    while True:
        found = [op for op in originals if op["index"] not in outside and _leaves(op, produced, read)]
        if not found:
            return list(outside.values())
        outside.update((op["index"], op) for op in found)
        read |= {int(t) for op in found for t in op["inputs"]}


def _leaves(op: dict, produced: set[int], read: set[int]) -> bool:
    outputs = {int(t) for t in op["outputs"]}
    return not outputs & produced and bool(outputs & read)
