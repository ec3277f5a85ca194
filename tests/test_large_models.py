"""The zoo's large models (``"large": true`` in zoo.json: the 3-GMAC detector), which the
generic zoo tests leave out: fp32 for one ONNX Runtime and one TFLite target, and one int8
build through the whole accuracy machinery (recovery variants, precision search, speed check).
Marked ``large``: ``pytest -m "not large"`` skips them."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from edgec.build import BuildOptions, build
from edgec.images import ImagePreprocess

pytestmark = pytest.mark.large

LARGE = [e for e in json.loads((REPO / "models" / "zoo.json").read_text()) if e.get("large")]


def _options(entry, **more):
    images = ImagePreprocess(tuple(entry["input_range"]))
    return BuildOptions(inputs=str(REPO / entry["eval_data"]), images=images, **more)


@pytest.mark.parametrize("target", ["ort-x86", "tflite-x86"])
@pytest.mark.parametrize("entry", LARGE, ids=lambda e: e["name"])
def test_large_model_builds_fp32(entry, target, tmp_path):
    result = build(REPO / "models" / entry["file"], target, tmp_path / "out", _options(entry))
    assert result.verification.passed
    assert all(o.relative_error <= 1e-4 for o in result.verification.outputs)


@pytest.mark.parametrize("entry", LARGE, ids=lambda e: e["name"])
def test_large_model_builds_int8_for_onnx_runtime(entry, tmp_path):
    """The target's criterion on held-out photos, whatever the search had to keep float."""
    options = _options(entry, precision="int8", calib=str(REPO / entry["calib_data"]))
    result = build(REPO / "models" / entry["file"], "ort-x86", tmp_path / "out", options)
    assert result.verification.passed
    assert min(o.cosine for o in result.verification.outputs) >= (0.99 if result.report["precision"] == "int8" else 0.9999)
