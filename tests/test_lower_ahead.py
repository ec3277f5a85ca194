"""Lowering work started ahead in a worker process (edgec.lower.ahead): the same artifact as
lowering in the build's process, and no process left behind."""

from __future__ import annotations

import dataclasses

import numpy as np
from helpers import GraphBuilder, save

from edgec.lower import BACKENDS, LowerOptions, ahead, background, lower, lower_ahead
from edgec.lower import tflite
from edgec.memo import Recent
from edgec.model import load
from edgec.runtime import TensorSpec
from edgec.targets import load_target
from edgec.verify import random_inputs


def _model(tmp_path):
    g = GraphBuilder(seed=2)
    h = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 3, 3, 3), g.weight(8)], pads=[1, 1, 1, 1])])
    y = g.op("Conv", [h, g.weight(4, 8, 3, 3), g.weight(4)], pads=[1, 1, 1, 1])
    return load(save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]}), tmp_path))


def test_an_int8_conversion_started_ahead_gives_the_same_file(tmp_path, monkeypatch):
    model, target = _model(tmp_path), load_target("tflite-x86")
    calibration = random_inputs([TensorSpec("x", (1, 3, 8, 8), np.dtype(np.float32))], seed=1, count=4)
    options = LowerOptions("int8", calibration, scheme=target.quantize)
    here = lower(model, target, "m", options)
    monkeypatch.setattr(tflite, "_CONVERTED", Recent(2))  # forget the conversion just made
    monkeypatch.setitem(BACKENDS, "tflite", dataclasses.replace(BACKENDS["tflite"], ahead_min_macs=0))  # small enough to test
    with background(model, target):
        lower_ahead(model, target, options)
        (started,) = ahead._pending.values()
        assert started.exception() is None, "the worker process must have converted it"
        there = lower(model, target, "m", options)
        assert not ahead._pending
        process = ahead._worker.child.process
    assert process.poll() is not None, "the worker must be stopped with the build"
    assert there.files == here.files


def test_small_models_and_other_backends_start_nothing(tmp_path):
    model = _model(tmp_path)
    for target in ("tflite-x86", "ort-x86"):
        with background(model, load_target(target)):
            assert not ahead.active()


def test_no_worker_process_where_the_scheduler_gave_one_cpu(tmp_path, monkeypatch):
    """A Ray task declaring one CPU (EDGEC_CPUS=1) lowers in its own process only."""
    model, target = _model(tmp_path), load_target("tflite-x86")
    monkeypatch.setitem(BACKENDS, "tflite", dataclasses.replace(BACKENDS["tflite"], ahead_min_macs=0))
    for cpus, started in (("1", False), ("2", True)):
        monkeypatch.setenv("EDGEC_CPUS", cpus)
        with background(model, target):
            assert ahead.active() is started
