"""Nothing in a build may reach the network (some ONNX→TFLite converters fetch sample files)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from helpers import GraphBuilder, save

from edgec.build import build


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("target", ["tflite-arm", "ort-x86"])
def test_build_never_touches_the_network(no_network, tmp_path, target):
    g = GraphBuilder()
    c = g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1])
    y = g.op("Resize", [c, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear")
    result = build(save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 16, 16]}), tmp_path), target, tmp_path / "out")
    assert result.verification.passed
