"""Small ONNX graphs built for the tests, and ways to run them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """Collects nodes and seeded random initializers, then makes a checked ModelProto."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def weight(self, *shape: int, scale: float = 0.3, name: str | None = None) -> str:
        return self.const(self.rng.standard_normal(shape).astype(np.float32) * scale, name)

    def const(self, array, name: str | None = None) -> str:
        self._count += 1
        name = name or f"c{self._count}"
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        self._count += 1
        outputs = [f"{op_type.lower()}{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name or f"{op_type}_{self._count}", **attrs))
        return outputs[0] if n_out == 1 else outputs

    def model(self, inputs: dict[str, Sequence], outputs: dict[str, Sequence | None], opset: int = OPSET) -> onnx.ModelProto:
        """``outputs`` maps a produced value to its declared shape (None: let inference say)."""
        graph = helper.make_graph(
            self.nodes, "test",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s) if s is not None else None) for n, s in outputs.items()],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
        return model


def binary_op(op_type: str, elem_type: int, out_elem_type: int | None = None) -> onnx.ModelProto:
    """``q = op_type(x, d)`` on two inputs of shape [1, 6] and type ``elem_type``."""
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x", "d"], ["q"], name=op_type.lower())], op_type.lower(),
        [helper.make_tensor_value_info(name, elem_type, [1, 6]) for name in ("x", "d")],
        [helper.make_tensor_value_info("q", out_elem_type or elem_type, [1, 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# Signs in every combination (integer Div: truncation and floor division disagree on the negative ones).
DIVIDENDS, DIVISORS, QUOTIENTS = [[7, -7, 7, -7, 100, -1]], [[2, 2, -2, -2, 7, 3]], [[3, -3, -3, 3, 14, 0]]


def save(model: onnx.ModelProto, directory: Path, name: str = "model") -> Path:
    path = Path(directory) / f"{name}.onnx"
    onnx.save(model, path)
    return path


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.graph.input
    }


def listing(directory: Path) -> list[str]:
    """Every file under ``directory`` (hidden ones included), for 'nothing left behind' checks."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) if directory.exists() else []
