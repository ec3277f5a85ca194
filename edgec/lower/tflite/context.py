"""What a rule sees of the node it lowers: names, static shapes, and a way to refuse."""

from __future__ import annotations

import re
from typing import NoReturn

import numpy as np
import onnx_ir as ir
import tensorflow as tf

from edgec.errors import UnsupportedOpError

ORT_HINT = "Build for an ONNX Runtime target instead (--target ort-arm or ort-x86), which runs every ONNX op."


class NodeContext:
    def __init__(self, node: ir.Node, target: str, names: set[str], loops: bool = True):
        self.node = node
        self.target = target
        self.loops = loops  # may the rule emit control flow (WHILE)?
        self._names = names

    def name(self, suffix: str = "") -> str:
        """A Keras layer name unique in the model, derived from the ONNX node's name."""
        base = sanitize(f"{self.node.name or self.node.op_type}{suffix}")
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def in_shape(self, index: int = 0) -> tuple[int, ...]:
        return _static(self.node.inputs[index], self)

    def out_shape(self, index: int = 0) -> tuple[int, ...]:
        return _static(self.node.outputs[index], self)

    def out_dtype(self, index: int = 0) -> tf.DType:
        return tf_dtype(self.node.outputs[index].dtype)

    def unsupported(self, reason: str) -> NoReturn:
        raise UnsupportedOpError(self.node.op_type, self.node.name or "?", target=self.target, reason=reason, hint=ORT_HINT)

    def require_constant(self, value, what: str) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            self.unsupported(f"its {what} is computed at run time; TFLite needs it constant")
        return value


def _static(value: ir.Value, ctx: NodeContext) -> tuple[int, ...]:
    if value.shape is None or not value.shape.is_static():
        ctx.unsupported(f"value '{value.name}' has no static shape")
    return tuple(int(d) for d in value.shape.dims)


def sanitize(name: str) -> str:
    """Keras layer/input names: letters, digits, '_', '.', '-' only, not starting with a digit."""
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip("_") or "tensor"
    return cleaned if cleaned[0].isalpha() else f"t_{cleaned}"


_TF_DTYPES = {
    ir.DataType.FLOAT: tf.float32,
    ir.DataType.FLOAT16: tf.float16,
    ir.DataType.DOUBLE: tf.float64,
    ir.DataType.INT64: tf.int64,
    ir.DataType.INT32: tf.int32,
    ir.DataType.INT16: tf.int16,
    ir.DataType.INT8: tf.int8,
    ir.DataType.UINT8: tf.uint8,
    ir.DataType.BOOL: tf.bool,
}


def tf_dtype(dtype: ir.DataType | None) -> tf.DType:
    if dtype not in _TF_DTYPES:
        raise UnsupportedOpError("Cast", "?", reason=f"element type {dtype} has no TFLite equivalent", hint=ORT_HINT)
    return _TF_DTYPES[dtype]


def is_tensor(value) -> bool:
    return value is not None and not isinstance(value, np.ndarray)
