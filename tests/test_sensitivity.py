"""``edgec analyze --sensitivity``: per channel group and rate, the error of pruning it alone."""

from __future__ import annotations

import json

import numpy as np
from helpers import GraphBuilder, save
from typer.testing import CliRunner

from edgec.cli import app

X = "x"


def _classifier():
    b = GraphBuilder(seed=1)
    h = b.op("Relu", [b.op("Conv", [X, b.weight(8, 3, 3, 3), b.weight(8)], pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Conv", [h, b.weight(12, 8, 3, 3), b.weight(12)], pads=[1, 1, 1, 1])])
    out = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])]), b.weight(12, 5)])
    return b.model({X: [1, 3, 6, 6]}, {out: None})


def test_sensitivity_writes_json_and_plot_with_a_curve_per_group(tmp_path):
    model = save(_classifier(), tmp_path)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.standard_normal((20, 3, 6, 6)).astype(np.float32), label=rng.integers(0, 5, 20))
    result = CliRunner().invoke(app, ["analyze", str(model), "--sensitivity", "--inputs", str(data),
                                      "--rates", "0.25,0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert (tmp_path / "out" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert [g["channels"] for g in report["groups"]] == [8, 12]
    assert report["frozen_groups"][0]["reasons"] == ["reaches a graph output"]
    for group in report["groups"]:
        removed = [p["removed"] for p in group["curve"]]
        errors = [p["relative_error"] for p in group["curve"]]
        assert removed == [round(group["channels"] * r) for r in (0.25, 0.5)]
        assert 0 < errors[0] <= errors[1]
        assert all("top1_drop" in p and 0 < p["mac_reduction"] < 1 for p in group["curve"])


def test_sensitivity_needs_an_analysis_and_data(tmp_path):
    model = save(_classifier(), tmp_path)
    assert CliRunner().invoke(app, ["analyze", str(model)]).exit_code == 2
    result = CliRunner().invoke(app, ["analyze", str(model), "--sensitivity"])
    assert result.exit_code == 2 and "needs real samples" in result.output
