"""A bug in edgec, wherever it strikes, is one message naming the stage, the pass and the node,
with a crash report outside the output directory, exit code 70, no traceback and nothing
written. Each case breaks one stage for real (a pass, a Keras rule, a runtime, the comparison,
a backend raising) and runs the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GraphBuilder, listing, save
from typer.testing import CliRunner

from edgec import crash
from edgec.cli import app
from edgec.errors import InternalError, ModelLoadError


def _conv_relu(tmp_path: Path) -> Path:
    g = GraphBuilder()
    y = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1], name="conv")], name="act")
    return save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 4, 8, 8]}), tmp_path)


def _assert_bug_reported(result, out_dir: Path, *fragments: str) -> Path:
    text = " ".join(result.output.split())
    assert result.exit_code == 70, result.output
    assert "Traceback" not in result.output
    assert "internal error:" in text and "This is a bug in edgec" in text and "--debug" in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert listing(out_dir) == []
    report = Path(re.search(r"crash report is (\S+\.txt)", text)[1])
    assert report.parent != out_dir and not report.is_relative_to(out_dir)
    content = report.read_text()
    assert "Traceback (most recent call last)" in content and "versions: " in content and "command: " in content
    report.unlink()
    return report


def _boom(*args, **kwargs):
    raise AttributeError("'list' object has no attribute 'size'")


def _build(path: Path, out: Path, target: str, *extra: str):
    return CliRunner().invoke(app, ["build", str(path), "-t", target, "-o", str(out), *extra])


def _unexpected(*args, **kwargs):
    raise InternalError("This .ort file has a session state edgec cannot rewrite.")


# What breaks (replaced by a raising function), the target built, what the message must name.
CORPUS = [
    ("edgec.passes.canonicalize.FoldBatchNorm.call", _boom, "ort-x86",
     ['stage "Canonicalizing', "pass fold-batchnorm", "AttributeError: 'list' object has no attribute 'size'"]),
    ("edgec.passes.layout._wrap", _boom, "tflite-x86", ['stage "Lowering for tflite-x86', "pass channels-last", "node 'conv' (Conv)"]),
    ("edgec.lower.ort._optimized_onnx", _boom, "ort-x86", ['stage "Lowering for ort-x86']),
    ("edgec.lower.ort.stable_ort", _unexpected, "ort-x86", ['stage "Lowering for ort-x86', "InternalError: This .ort file"]),
    ("edgec.verify.compare_outputs", _boom, "ort-x86", ['stage "Verifying against the source model"']),
]


@pytest.mark.parametrize(("broken", "raiser", "target", "fragments"), CORPUS, ids=[c[0].rsplit(".", 1)[-1] for c in CORPUS])
def test_a_stage_raising(tmp_path, monkeypatch, broken, raiser, target, fragments):
    monkeypatch.setattr(broken, raiser)
    _assert_bug_reported(_build(_conv_relu(tmp_path), tmp_path / "out", target), tmp_path / "out", *fragments)


def test_a_keras_rule_raising_names_the_node(tmp_path, monkeypatch):
    from edgec.lower.tflite import registry

    monkeypatch.setitem(registry.RULES, ("", "Relu"), _boom)
    result = _build(_conv_relu(tmp_path), tmp_path / "out", "tflite-x86")
    _assert_bug_reported(result, tmp_path / "out", 'stage "Lowering for tflite-x86', "node 'act' (Relu)")


def test_the_runtime_refusing_edgecs_own_artifact(tmp_path, monkeypatch):
    """A runtime that cannot load what edgec built is edgec's bug, not a bad user file."""
    from edgec import runtime

    def refuse(path, threads, options):
        raise ModelLoadError("ONNX Runtime cannot load the model: broken graph")

    monkeypatch.setitem(runtime.RUNNERS, ".onnx", refuse)
    result = _build(_conv_relu(tmp_path), tmp_path / "out", "ort-x86")
    _assert_bug_reported(result, tmp_path / "out", 'stage "Verifying against the source model"', "model.onnx", "broken graph")


def test_other_commands_report_bugs_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setattr("edgec.profile.profile", _boom)
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(_conv_relu(tmp_path).read_bytes())
    result = CliRunner().invoke(app, ["profile", str(artifact), "-o", str(tmp_path / "prof")])
    _assert_bug_reported(result, tmp_path / "prof", "crashed in `edgec profile`: AttributeError")
    monkeypatch.setattr("edgec.analysis.inspect_file", _boom)
    _assert_bug_reported(CliRunner().invoke(app, ["inspect", str(artifact)]), tmp_path / "none", "crashed in `edgec inspect`:")


def test_debug_shows_the_original_exception(tmp_path, monkeypatch):
    from edgec.passes.canonicalize import FoldBatchNorm

    monkeypatch.setattr(FoldBatchNorm, "call", _boom)
    result = _build(_conv_relu(tmp_path), tmp_path / "out", "ort-x86", "--debug")
    assert isinstance(result.exception, AttributeError)
    assert crash.where(result.exception)["pass"] == "fold-batchnorm"
    assert listing(tmp_path / "out") == []


def test_real_process_prints_no_traceback(tmp_path):
    """Through edgec's own ``__main__`` in a fresh interpreter: stderr holds the one message."""
    path, out = _conv_relu(tmp_path), tmp_path / "out"
    script = ("import runpy, sys; from edgec.passes.canonicalize import FoldBatchNorm\n"
              "def boom(*a, **k): raise KeyError('scale')\n"
              "FoldBatchNorm.call = boom\n"
              f"sys.argv = ['edgec', 'build', {str(path)!r}, '-t', 'ort-x86', '-o', {str(out)!r}]\n"
              "runpy.run_module('edgec', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 70, proc.stderr
    assert "Traceback" not in proc.stderr and "─" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert "pass fold-batchnorm" in text and "KeyError: 'scale'" in text
    Path(re.search(r"crash report is (\S+\.txt)", text)[1]).unlink()
    assert listing(out) == []


@pytest.mark.parametrize("mark", ["stage", "node"])
def test_where_is_recorded_innermost_and_left_off_user_errors(mark):
    with pytest.raises(ValueError) as caught, crash.at("stage", "outer"), crash.at(mark, "inner"):
        raise ValueError("x")
    assert crash.where(caught.value)[mark] == "inner"
    with pytest.raises(ModelLoadError) as user, crash.at("stage", "outer"):
        raise ModelLoadError("bad file")
    assert crash.where(user.value) is None


def test_onnx_runtime_refusing_a_model_edgec_made_in_memory_is_a_bug(tmp_path):
    """A pass's model that ORT refuses (once: two factors both named '_svd0') is edgec's
    bug; the same bytes as a file on disk may be anyone's and stay a load error."""
    from edgec.runtime.ort import OrtRunner

    g = GraphBuilder()
    y = g.op("Relu", [g.op("Relu", ["x"], name="twin")], name="twin")
    proto = g.model({"x": [1, 4]}, {y: [1, 4]})
    assert [n.name for n in proto.graph.node] == ["twin", "twin"]
    with pytest.raises(Exception, match="same node name") as info:
        OrtRunner(proto.SerializeToString())
    assert not isinstance(info.value, ModelLoadError)
    with pytest.raises(ModelLoadError, match="same node name"):
        OrtRunner(save(proto, tmp_path))
