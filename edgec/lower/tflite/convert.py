"""Keras model → ``.tflite`` bytes with TensorFlow's converter, plus edgec's metadata.

Only TFLite builtin ops are allowed (no Flex/Select TF ops): an artifact that needs the
TensorFlow runtime on the device is not an edge artifact. The converter runs offline; it
fetches nothing.
"""

from __future__ import annotations

import logging

import flatbuffers
import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert import schema_py_generated as tfl_schema

from edgec.errors import UnsupportedOpError
from edgec.lower.tflite.context import ORT_HINT
from edgec.quiet import captured_stderr

_FILE_IDENTIFIER = b"TFL3"


def keras_to_tflite(model: keras.Model, target: str) -> bytes:
    logging.getLogger("absl").setLevel(logging.ERROR)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        with captured_stderr():  # the converter logs every MLIR pass to fd 2
            return converter.convert()
    except Exception as exc:  # ConverterError and friends carry MLIR diagnostics
        raise UnsupportedOpError(
            "?", model.name, target=target,
            reason=f"the TFLite converter rejected the lowered model: {_diagnostic(exc)}",
            hint=ORT_HINT,
        ) from exc


def _diagnostic(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "error:" in line]
    return lines[0] if lines else str(exc).strip().splitlines()[0]


def add_metadata(content: bytes, name: str, data: bytes) -> bytes:
    """Append a named metadata entry (a standard TFLite flatbuffer field) to a model."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buffer = tfl_schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = tfl_schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    builder = flatbuffers.Builder(len(content) + len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output())


_BUILTIN_NAMES = {v: k for k, v in vars(tfl_schema.BuiltinOperator).items() if not k.startswith("_")}


def op_histogram(content: bytes) -> dict[str, int]:
    """Count the operators of a .tflite's main subgraph by builtin name."""
    model = tfl_schema.Model.GetRootAs(content, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        codes.append(_BUILTIN_NAMES.get(builtin, f"CUSTOM:{code.CustomCode()}"))
    counts: dict[str, int] = {}
    graph = model.Subgraphs(0)
    for i in range(graph.OperatorsLength()):
        name = codes[graph.Operators(i).OpcodeIndex()]
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
