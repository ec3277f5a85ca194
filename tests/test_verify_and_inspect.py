"""Verification inputs and metrics, runners' layout handling, inspect's MAC counts,
determinism of builds, and target files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from helpers import GraphBuilder, save
from typer.testing import CliRunner

from edgec.analysis import inspect_file
from edgec.build import BuildOptions, build
from edgec.cli import app
from edgec.errors import EdgecWarning, InputDataError, TargetError
from edgec.runtime import TensorSpec, open_runner
from edgec.targets import known_targets, load_target
from edgec.stages.source import source_runner
from edgec.stages.verify import criterion
from edgec.verify import Criterion, OutputComparison, float_noise, load_inputs, random_inputs, run_all

SPEC = [TensorSpec("x", (2, 3), np.dtype(np.float32))]


def test_inputs_are_grouped_into_batches_with_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.arange(30, dtype=np.float32).reshape(10, 3), label=np.arange(10))
    inputs = load_inputs(tmp_path / "d.npz", SPEC)
    assert len(inputs.batches) == 5 and inputs.batches[1]["x"].shape == (2, 3)
    assert inputs.labels.tolist() == list(range(10))


def test_a_partial_last_batch_is_dropped(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((5, 3), np.float32))
    assert len(load_inputs(tmp_path / "d.npy", SPEC).batches) == 2


@pytest.mark.parametrize("data, message", [
    ({"x": np.zeros((4, 5), np.float32)}, "expected \\[N, 3\\]"),
    ({"x": np.full((4, 3), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((4, 3), np.int64)}, "dtype int64"),
    ({"y": np.zeros((4, 3), np.float32)}, "no array for input"),
    ({"x": np.zeros((0, 3), np.float32)}, "expected|fewer than one batch"),
    ({"x": np.zeros((4, 3), np.float32), "label": np.zeros(3)}, "3 labels for 4 samples"),
])
def test_bad_inputs_files_are_explained(tmp_path, data, message):
    np.savez(tmp_path / "d.npz", **data)
    with pytest.raises(InputDataError, match=message):
        load_inputs(tmp_path / "d.npz", SPEC)


def test_unreadable_inputs_file(tmp_path):
    (tmp_path / "d.npz").write_text("not numpy")
    with pytest.raises(InputDataError, match="Cannot read"):
        load_inputs(tmp_path / "d.npz", SPEC)


def test_random_inputs_are_seeded():
    a, b = random_inputs(SPEC, seed=7), random_inputs(SPEC, seed=7)
    assert all(np.array_equal(x["x"], y["x"]) for x, y in zip(a.batches, b.batches))
    assert not np.array_equal(a.batches[0]["x"], random_inputs(SPEC, seed=8).batches[0]["x"])


def test_random_token_ids_span_the_vocabulary_they_index(tmp_path):
    """Token ids (cast and reshaped on the way, as exporters do) drawn in [0, 2) would check
    two rows of an embedding table; a mask that indexes nothing stays 0/1."""
    g = GraphBuilder()
    ids = g.op("Reshape", [g.op("Cast", ["ids"], to=7), g.const(np.array([1, 16], np.int64))])
    embedded = g.op("Gather", [g.weight(50, 8), ids])
    y = g.op("Mul", [embedded, g.op("Unsqueeze", [g.op("Cast", ["mask"], to=1), g.const(np.array([2], np.int64))])])
    proto = g.model({"ids": [1, 16], "mask": [1, 16]}, {y: [1, 16, 8]})
    for value in proto.graph.input:
        value.type.tensor_type.elem_type = 7  # int64
    result = build(save(proto, tmp_path), "tflite-arm", tmp_path / "out", BuildOptions(seed=3))
    assert result.verification.passed
    assert result.report["verification"]["inputs"]["source"] == "random (seed 3, 4 batches; ids below 50)"
    batches = random_inputs([TensorSpec("ids", (1, 16), np.dtype(np.int64), 50), TensorSpec("m", (1, 16), np.dtype(np.int64))])
    ids, mask = (np.stack([b[name] for b in batches.batches]) for name in ("ids", "m"))
    assert ids.max() > 40 and ids.min() >= 0 and set(np.unique(mask)) == {0, 1}


def _classifier(tmp_path):
    g = GraphBuilder()
    c = g.op("Relu", [g.op("Conv", ["x", g.weight(4, 3, 3, 3)], pads=[1, 1, 1, 1])])
    y = g.op("Gemm", [g.op("Flatten", [c]), g.weight(256, 5)])
    return save(g.model({"x": [1, 3, 8, 8]}, {y: [1, 5]}), tmp_path)


def test_tflite_runner_speaks_the_source_layout(tmp_path):
    path = _classifier(tmp_path)
    build(path, "tflite-arm", tmp_path / "out")
    runner = open_runner(tmp_path / "out" / "model.tflite")
    assert [(s.name, s.shape) for s in runner.inputs] == [("x", (1, 3, 8, 8))]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = open_runner(path).run({"x": x})
    got = runner.run({"x": x})
    np.testing.assert_allclose(got[next(iter(want))], next(iter(want.values())), rtol=1e-4, atol=1e-5)


def test_labels_give_accuracy_of_both_models(tmp_path):
    path = _classifier(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((6, 3, 8, 8)).astype(np.float32), label=rng.integers(0, 5, 6))
    result = build(path, "ort-x86", tmp_path / "out", BuildOptions(inputs=str(tmp_path / "eval.npz")))
    out = result.verification.outputs[0]
    assert out.top1_agreement == 1.0
    assert out.accuracy_source == out.accuracy_artifact is not None


def test_verify_command(tmp_path):
    path = _classifier(tmp_path)
    build(path, "tflite-x86", tmp_path / "out")
    result = CliRunner().invoke(app, ["verify", str(path), str(tmp_path / "out" / "model.tflite"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"] is True


def test_builds_are_deterministic(tmp_path):
    path = _classifier(tmp_path)
    for target in ("tflite-arm", "ort-x86"):
        first = build(path, target, tmp_path / f"{target}-a")
        second = build(path, target, tmp_path / f"{target}-b")
        for a, b in zip(first.artifacts, second.artifacts):
            assert a.read_bytes() == b.read_bytes(), a.name
        assert first.report_path.read_bytes() == second.report_path.read_bytes()


def test_ort_builds_are_identical_across_processes(tmp_path):
    """ORT's NCHWc layout pass (ort-x86, level "all") names and orders the nodes it adds, and
    its .ort writer lays out its kernel table, differently in every process (pointer-keyed
    maps under address randomization); edgec writes both in one canonical form."""
    model = REPO / "models" / "mobilenetv3.onnx"
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "edgec", "build", str(model), "-t", "ort-x86", "-o", str(tmp_path / name)],
                       check=True, capture_output=True)
    for file in ("mobilenetv3.onnx", "mobilenetv3.ort", "report.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    onnx_runner, ort_runner = (open_runner(tmp_path / "a" / f"mobilenetv3.{fmt}") for fmt in ("onnx", "ort"))
    feeds = random_inputs(onnx_runner.inputs).batches[0]
    np.testing.assert_array_equal(onnx_runner.run(feeds)["logits"], ort_runner.run(feeds)["logits"])


def test_the_edgec_process_has_written_everything_when_it_ends(tmp_path):
    """The command ends without tearing TensorFlow's modules down (``cli.main``): its piped
    output, artifact and report are complete, and its scratch files are gone."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "edgec", "build", str(_classifier(tmp_path)), "-t", "tflite-x86",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr
    assert " ".join(done.stdout.split()).endswith(f"Report: {tmp_path / 'out' / 'report.json'}")  # rich wraps lines
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verification"]["passed"]
    assert open_runner(tmp_path / "out" / "model.tflite").inputs
    assert list(scratch.iterdir()) == []


def test_report_records_passes_io_and_artifacts(tmp_path):
    report = build(_classifier(tmp_path), "tflite-arm", tmp_path / "out").report
    assert report["status"] == "ok" and report["target"]["name"] == "tflite-arm"
    assert report["model"]["inputs"][0]["shape"] == [1, 3, 8, 8]  # the source's view, not the lowered one
    assert {"simplify", "fold-batchnorm"} <= {p["name"] for p in report["passes"]}
    assert report["lowering"]["io"]["inputs"][0]["perm"] == [0, 2, 3, 1]
    assert report["artifacts"][0]["file"] == "model.tflite"


def test_inspect_counts_macs_per_layer(tmp_path):
    g = GraphBuilder()
    c = g.op("Conv", ["x", g.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1], strides=[2, 2], name="conv")
    d = g.op("Conv", [c, g.weight(8, 1, 3, 3)], pads=[1, 1, 1, 1], group=8, name="dw")
    y = g.op("Gemm", [g.op("Flatten", [d]), g.weight(128, 10)], name="fc")
    summary = inspect_file(save(g.model({"x": ["n", 3, 8, 8]}, {y: ["n", 10]}), tmp_path), {"x": (1, 3, 8, 8)})
    macs = {row["name"]: row["macs"] for row in summary["layers"]}
    assert macs == {"conv": 8 * 4 * 4 * 3 * 9, "dw": 8 * 4 * 4 * 9, "fc": 10 * 128}
    assert summary["macs"] == sum(macs.values())
    assert summary["params"] == 8 * 27 + 8 * 9 + 1280
    assert summary["op_histogram"] == {"Conv": 2, "Flatten": 1, "Gemm": 1}


def test_inspect_cli_json(tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(_classifier(tmp_path)), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["size_bytes"] > 0 and data["macs"] > 0


def test_inspect_prints_notes_as_warning_lines_and_symbolic_shapes(tmp_path, recwarn):
    """As build does: the stale-shape note is the CLI's ``warning:`` line, not a Python warning."""
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    model = g.model({"x": ["batch", 4]}, {y: ["batch", 4]})
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 3  # stale
    result = CliRunner().invoke(app, ["inspect", str(save(model, tmp_path))])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"warning: Declared shapes replaced by what the graph computes: output '{y}' is declared batchx3 but computes batchx4" in text
    assert "input x: float[batchx4]" in text
    assert not [w for w in recwarn if issubclass(w.category, EdgecWarning)]


def test_the_four_targets_ship(repo):
    assert known_targets() == ["ort-arm", "ort-x86", "tflite-arm", "tflite-x86"]
    assert {load_target(t).arch for t in known_targets()} == {"arm64", "x86_64"}


def test_a_target_file_is_validated(tmp_path):
    (tmp_path / "t.toml").write_text('name = "t"\nbackend = "tflite"\narch = "riscv"\n')
    with pytest.raises(TargetError, match="arch must be one of"):
        load_target(str(tmp_path / "t.toml"))
    (tmp_path / "u.toml").write_text('name = "u"\nbackend = "ort"\narch = "x86_64"\nthreds = 2\n')
    with pytest.raises(TargetError, match="unknown keys \\['threds'\\]"):
        load_target(str(tmp_path / "u.toml"))


def test_a_new_target_is_just_a_file(tmp_path):
    (tmp_path / "ort-x86-1t.toml").write_text(
        'name = "ort-x86-1t"\nbackend = "ort"\narch = "x86_64"\n[runtime]\nthreads = 1\ngraph_optimization = "basic"\nformats = ["onnx"]\n')
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    result = build(save(g.model({"x": [1, 4]}, {y: [1, 4]}), tmp_path), str(tmp_path / "ort-x86-1t.toml"), tmp_path / "out")
    assert [p.name for p in result.artifacts] == ["model.onnx"]


def test_litert_runner_reads_a_tflite_without_signatures():
    """MediaPipe's production files predate signatures; the runner binds tensors by name."""
    runner = open_runner(REPO / "models" / "pretrained" / "hand_recrop.tflite")
    assert [s.name for s in runner.inputs] and [s.name for s in runner.outputs]
    (spec,) = runner.inputs
    out = runner.run({spec.name: np.zeros(spec.shape, spec.dtype)})
    assert set(out) == {s.name for s in runner.outputs}


def _image_folder(tmp_path, count=3):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(count):
        pixels = np.zeros((20, 30, 3), np.uint8)
        pixels[:, 15:] = 255  # black left half, white right half: extremes survive resizing
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("shape", [(1, 3, 8, 12), (1, 8, 12, 3)])
def test_image_folder_is_resized_scaled_and_laid_out_like_the_input(tmp_path, shape):
    from edgec.images import ImagePreprocess

    spec = [TensorSpec("img", shape, np.dtype(np.float32))]
    inputs = load_inputs(_image_folder(tmp_path), spec, images=ImagePreprocess((-1.0, 1.0)))
    assert len(inputs.batches) == 3
    batch = inputs.batches[0]["img"]
    assert batch.shape == shape and batch.dtype == np.float32
    assert batch.min() == pytest.approx(-1.0) and batch.max() == pytest.approx(1.0)


def test_image_folder_mean_and_std_apply_per_channel(tmp_path):
    from edgec.images import ImagePreprocess

    spec = [TensorSpec("img", (1, 3, 4, 4), np.dtype(np.float32))]
    folder = _image_folder(tmp_path, count=1)
    plain = load_inputs(folder, spec).batches[0]["img"]
    normalized = load_inputs(folder, spec, images=ImagePreprocess((0.0, 1.0), (0.5, 0.4, 0.3), (0.2, 0.2, 0.1))).batches[0]["img"]
    expected = (plain - np.array([0.5, 0.4, 0.3], np.float32)[:, None, None]) / np.array([0.2, 0.2, 0.1], np.float32)[:, None, None]
    np.testing.assert_allclose(normalized, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("specs", "message"), [
    ([TensorSpec("a", (1, 3, 8, 8), np.dtype(np.float32)), TensorSpec("b", (1, 3, 8, 8), np.dtype(np.float32))], "one float image input"),
    ([TensorSpec("tokens", (1, 8, 16), np.dtype(np.float32))], "one float image input"),
])
def test_image_folder_refuses_models_without_one_image_input(tmp_path, specs, message):
    with pytest.raises(InputDataError, match=message):
        load_inputs(_image_folder(tmp_path), specs)


def test_image_folder_errors_name_the_problem(tmp_path):
    spec = [TensorSpec("img", (1, 3, 8, 8), np.dtype(np.float32))]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="holds no images"):
        load_inputs(empty, spec)
    folder = _image_folder(tmp_path)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputDataError, match="Cannot read image .*broken.jpg"):
        load_inputs(folder, spec)


def test_cli_rejects_a_malformed_image_range(tmp_path):
    g = GraphBuilder()
    y = g.op("Relu", ["x"])
    path = save(g.model({"x": [1, 3, 4, 4]}, {y: [1, 3, 4, 4]}), tmp_path)
    result = CliRunner().invoke(app, ["build", str(path), "-t", "ort-x86", "-o", str(tmp_path / "out"), "--image-range", "0"])
    assert result.exit_code == 2 and "--image-range takes two numbers" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tolerance, error, noise, passes", [
    (1e-4, 3e-4, None, False),  # nothing measured: the fixed bound
    (1e-4, 3e-4, 2e-4, True),  # within twice what the reference moves by itself
    (1e-4, 3e-4, 1e-4, False),  # twice that is 2e-4, still short
    (0.0, 3e-4, 2e-4, False),  # --tolerance 0 still asks for an exact match
    (1e-4, 5e-2, 0.2, False),  # a chaotic reference stretches the bound only to 1e-2
])
def test_fp32_criterion_stretches_to_the_references_own_float_noise(tolerance, error, noise, passes):
    off = OutputComparison("y", [4], error, 1.0, error, error / 3, 1.0, False, float_noise=noise)
    assert Criterion(tolerance=tolerance).accepts(off, model_scale=1.0) is passes
    assert not Criterion(tolerance=tolerance, float_noise_multiple=None).accepts(off, model_scale=1.0)  # --tolerance


def test_a_users_tolerance_is_kept_as_given():
    target = load_target("tflite-x86")
    assert criterion(target, "fp32", BuildOptions()).stretches
    chosen = criterion(target, "fp32", BuildOptions(tolerance=1e-3))
    assert not chosen.stretches and "float_noise_multiple" not in chosen.to_dict()


def test_float_noise_is_measured_on_the_source_and_reported(tmp_path):
    """A fp32 build runs the source a second time with ONNX Runtime's graph optimizations on
    (fused Conv + Add sums in another order) and reports each output's noise."""
    g = GraphBuilder()
    y = g.op("Add", [g.op("Conv", ["x", g.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1]), g.weight(1, 8, 1, 1)])
    path = save(g.model({"x": [1, 3, 8, 8]}, {g.op("Relu", [y]): [1, 8, 8, 8]}), tmp_path)
    source = source_runner(path)
    assert source.reordered()._optimization == "all"
    inputs = random_inputs(source.inputs, seed=0)
    noise = float_noise(source, inputs, run_all(source, inputs.batches))
    assert list(noise) == [o.name for o in source.outputs] and 0 <= min(noise.values()) < 1e-5
    report = build(path, "tflite-x86", tmp_path / "out", BuildOptions()).report
    assert report["verification"]["outputs"][0]["float_noise"] == pytest.approx(next(iter(noise.values())))
    int8 = build(path, "tflite-x86", tmp_path / "int8", BuildOptions(precision="int8", min_cosine=0.0, speed_check=False)).report
    assert "float_noise" not in int8["verification"]["outputs"][0]  # a cosine criterion has no use for it


def test_a_chaotic_reference_is_named_instead_of_a_lowering_bug():
    from edgec.stages.verify import verification_error
    from edgec.verify import Verification

    off = OutputComparison("y", [4], 0.1, 1.0, 0.1, 0.03, 0.99, False, float_noise=0.2)
    verification = Verification(False, Criterion(tolerance=1e-4), {}, "onnxruntime", "litert", [off])
    assert "numerically unstable" in verification_error(verification, "fp32").hint
    off.float_noise = 1e-6
    assert "lowering bug" in verification_error(verification, "fp32").hint


def test_the_same_infinities_and_nans_on_both_sides_match():
    """A masked attention score is -inf in the source and in a faithful artifact: that is a
    match, and the finite rest is compared as usual; an infinity on one side only is not."""
    from edgec.verify import compare_outputs

    ref = np.array([[[0.5, -np.inf, 2.0, np.nan]]], np.float32)
    strict = Criterion(tolerance=1e-4)
    same, = compare_outputs({"scores": ref}, {"scores": ref + np.float32(1e-6)}, None, strict)
    assert same.passed and same.max_abs_error == pytest.approx(1e-6, rel=0.1) and same.max_abs_reference == 2.0
    off, = compare_outputs({"scores": ref}, {"scores": np.where(np.isinf(ref), 0, ref)}, None, strict)
    assert not off.passed and off.max_abs_error == float("inf")
    worse, = compare_outputs({"scores": ref}, {"scores": ref + np.float32(0.1)}, None, strict)
    assert not worse.passed and worse.max_abs_error == pytest.approx(0.1, rel=0.01)
