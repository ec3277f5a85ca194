"""`edgec profile` and `edgec build --profile`: stats, per-op breakdowns, profile.json and a
self-contained report.html, and clear errors. Timings are never compared with absolute
numbers: only with each other inside one profiled run."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from conftest import REPO
from helpers import listing
from typer.testing import CliRunner

from edgec.build import build
from edgec.cli import app
from edgec.profile import SCHEMA, ProfileSettings, profile
from edgec.profile.ops import Profiled, ProfiledRun, summarize
from edgec.report.profile import profile_report, render_html

FEW_RUNS = ["--runs", "5", "--warmup", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """ResNet (the zoo's slowest model, median above 1 ms here) for both runtimes."""
    out = tmp_path_factory.mktemp("zoo")
    build(REPO / "models" / "resnet.onnx", "tflite-x86", out / "tflite")
    build(REPO / "models" / "resnet.onnx", "ort-x86", out / "ort")
    return [out / "tflite" / "resnet.tflite", out / "ort" / "resnet.ort", out / "ort" / "resnet.onnx"]


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


class _Elements(HTMLParser):
    """Tags by name, and text by the class of its element."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.text_by_class: dict[str, list[str]] = {}
        self._classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self._classes.append(dict(attrs).get("class", ""))

    def handle_endtag(self, tag):
        if self._classes:
            self._classes.pop()

    def handle_data(self, data):
        if self._classes and self._classes[-1]:
            self.text_by_class.setdefault(self._classes[-1], []).append(data.strip())


def test_profile_cli_prints_table_and_writes_json_and_html(artifacts, tmp_path):
    result = _cli("profile", *map(str, artifacts), *FEW_RUNS, "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "median" in result.output and "Top ops" in result.output
    report = json.loads((tmp_path / "out" / "profile.json").read_text())
    measurements = report["measurements"]
    assert [m["artifact"]["file"] for m in measurements] == [a.name for a in artifacts]
    for m in measurements:
        assert m["schema"] == SCHEMA and m["device"]["kind"] == "local" and not m["device"]["emulated"]
        assert m["latency_ms"]["runs"] == len(m["latency_ms"]["samples"]) == 5
        assert m["latency_ms"]["min"] <= m["latency_ms"]["median"] <= m["latency_ms"]["p99"]
        assert m["load_ms"] > 0 and m["peak_memory_mb"] > 0
    page = _Elements()
    page.feed((tmp_path / "out" / "report.html").read_text())
    # distribution + comparison of the three + one per-op chart each; nothing fetched from elsewhere
    assert page.tags["svg"] >= 5
    assert "http://" not in page.rawdata.replace("http://www.w3.org", "") and "https://" not in page.rawdata
    assert page.text_by_class["median"] == [f"{m['latency_ms']['median']:.4g}" for m in measurements]
    assert page.text_by_class["ops-total"] == [f"{m['ops']['total_ms']:.4g} ms" for m in measurements]
    assert len(page.text_by_class["unaccounted"]) == len(measurements)


def test_ops_breakdown_adds_up_inside_each_profiled_run(artifacts):
    """The op total is what the end-to-end median is compared with; inside the profiled runs
    it must cover most of each run and never exceed it (the ops run inside the run)."""
    for artifact in artifacts[:2]:
        ops = profile(artifact, "local", ProfileSettings(warmup=2, runs=10, threads=1))["ops"]
        assert 0.5 < ops["profiled_coverage"] <= 1.05, ops
        assert sum(t["ms"] for t in ops["by_type"]) == pytest.approx(ops["total_ms"])
        assert ops["unaccounted_ms"] == pytest.approx(ops["end_to_end_median_ms"] - ops["total_ms"])
        assert ops["by_type"][0]["op"] in ("Conv", "Convolution (NHWC, F32) IGEMM")  # a ResNet is its convolutions


def test_summary_describes_a_typical_run_not_a_preempted_one():
    walls = [118, 120, 121, 122, 125, 126, 127, 128, 130, 5120]  # one run preempted
    runs = [ProfiledRun(wall, {("conv1", "Conv"): wall - 20.0, ("relu1", "Relu"): 10.0}) for wall in walls]
    ops = summarize(Profiled(runs, "test"), median_ms=0.125)
    # the fifth around the median by wall time: 125, 126 and 127 µs
    assert ops["runs"] == 10 and ops["typical_runs"] == 3
    assert ops["total_ms"] == pytest.approx(0.116)
    assert ops["by_type"][0] == {"op": "Conv", "ms": pytest.approx(0.106), "share": pytest.approx(0.106 / 0.116), "nodes": 1}
    assert ops["unaccounted_share"] == pytest.approx((0.125 - 0.116) / 0.125)
    assert ops["profiled_coverage"] == pytest.approx(0.116 / 0.126)
    assert ops["rounding_bound_ms"] == pytest.approx(0.002)


def test_budget_stops_timing_early_and_is_recorded(artifacts):
    latency = profile(artifacts[1], "local", ProfileSettings(warmup=1, runs=100_000, budget_s=0.05, threads=1, ops=False))["latency_ms"]
    assert 3 <= latency["runs"] < 100_000 and latency["budget_s"] == 0.05


def test_report_html_is_deterministic(artifacts):
    measurement = profile(artifacts[1], "local", ProfileSettings(warmup=1, runs=3, threads=1, ops=False))
    report = profile_report([measurement], ProfileSettings(warmup=1, runs=3, threads=1, ops=False))
    assert render_html(report) == render_html(report)


def test_report_marks_emulated_wall_times_and_compares_their_cost(artifacts):
    """Emulated devices come from another transport; their measurements have this shape."""
    local = profile(artifacts[1], "local", ProfileSettings(warmup=1, runs=3, threads=1, ops=False))
    emulated = [
        {**local, "device": {"name": "a76-emu", "kind": "emulated", "arch": "aarch64", "cpu": "cortex-a76", "emulated": True},
         "artifact": {**local["artifact"], "path": f"/variants/{name}/resnet.ort"}, "cost": {"instructions": count}}
        for name, count in (("fp32", 3_000_000), ("int8", 1_000_000))
    ]
    page = render_html(profile_report([local, *emulated], ProfileSettings()))
    assert page.count('<tr class="emulated">') == 2 and "a76-emu" in page
    assert 'id="cost"' in page and "instructions 3,000,000" in page and "instructions 1,000,000" in page
    assert "fp32/resnet.ort" in page and "int8/resnet.ort" in page
    assert "0.33× (instructions)" in page  # int8 ÷ fp32 on the emulated device, by cost


def test_build_with_profile_puts_the_measurement_in_its_outputs(tmp_path):
    result = _cli("build", str(REPO / "models" / "mlp.onnx"), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--profile", "local")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["profile"]["artifact"]["file"] == "mlp.onnx"
    assert report["profile"]["artifact"]["sha256"] == next(a["sha256"] for a in report["artifacts"] if a["file"] == "mlp.onnx")
    assert "<svg" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "{tmp}/nope.tflite"], "No such artifact"),
        (["profile", str(REPO / "README.md")], "which no runner handles"),
        (["profile", str(REPO / "models" / "mlp.onnx"), "--device", "rpi5"], "Unknown device 'rpi5'"),
        (["build", str(REPO / "models" / "mlp.onnx"), "-t", "ort-x86", "--profile", "rpi5"], "Unknown device 'rpi5'"),
    ],
)
def test_profile_errors_are_one_paragraph_and_leave_nothing(args, message, tmp_path):
    result = _cli(*(a.format(tmp=tmp_path) for a in args), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert message in re.sub(r"\s+", " ", result.output)
    assert listing(tmp_path / "out") == []
