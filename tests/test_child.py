"""edgec.child: calls run in a child interpreter, whose native crash is a signal for the
caller (and onnxsim's segfault, through it, a fallback instead of a dead build)."""

from __future__ import annotations

import os
import platform
import signal
import warnings

import numpy as np
import onnx
import pytest
from helpers import GraphBuilder, save
from typer.testing import CliRunner

from edgec.child import ChildCrashed, ChildError, ChildInterpreter
from edgec.cli import app
from edgec.passes import simplifier


@pytest.fixture
def child():
    interpreter = ChildInterpreter("os")
    yield interpreter
    interpreter.stop()


def test_a_call_returns_its_result_and_warnings(child):
    assert child.call(len, "abc") == (3, [])
    _, warned = child.call(warnings.warn, "careful")
    assert [str(w) for w in warned] == ["careful"]


def test_an_exception_in_the_child_is_a_child_error_and_the_child_goes_on(child):
    with pytest.raises(ChildError, match="ValueError: invalid literal"):
        child.call(int, "x")
    assert child.call(abs, -2) == (2, [])


def test_a_native_crash_is_the_childs_signal(child):
    with pytest.raises(ChildCrashed) as crashed:
        child.call(os.abort)
    assert crashed.value.signal == signal.SIGABRT
    assert not child.alive()


def _empty_shape_reshape() -> onnx.ModelProto:
    """``Reshape(x, Concat(Shape(x, start=2, end=1), [-1]))``: the Shape is empty, so x is flattened."""
    g = GraphBuilder()
    empty = g.op("Shape", ["x"], start=2, end=1)
    shape = g.op("Concat", [empty, g.const(np.array([-1], np.int64))], axis=0)
    y = g.op("Reshape", ["x", shape])
    return g.model({"x": [3, 4, 5]}, {y: [60]})


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the segfault was seen with onnxsim's x86_64 wheel")
def test_onnxsim_crashing_on_a_model_leaves_the_build_to_edgecs_folder(tmp_path):
    """onnxsim 0.4.36 segfaults on a Shape whose start is past its end, which ended the build
    with no message; the build now folds without it, says so, and passes, and the next model
    gets a new simplifier child."""
    path = save(_empty_shape_reshape(), tmp_path)
    result = CliRunner().invoke(app, ["build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "onnxsim could not simplify the model (onnxsim crashed (SIGSEGV))" in " ".join(result.output.split())
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    simplified = simplifier.simplify(g.model({"x": [1, 4]}, {y: [1, 4]}), tensor_size_threshold="1KB")
    assert [n.op_type for n in simplified.graph.node] == ["Relu"]
