"""Fine-tuning (edgec.train): weights traced back to ONNX exactly, distillation that helps,
labels, determinism, and the errors a user can cause. Tiny models, one or two epochs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
import pytest
from helpers import GraphBuilder, listing, run_ort, save
from typer.testing import CliRunner

from edgec.build import BuildOptions, build, canonicalize
from edgec.cli import app
from edgec.errors import EdgecError, InputDataError, OptionError, RecipeError
from edgec.lower.tflite import prepare, to_keras
from edgec.model import to_proto
from edgec.recipe import Step, make_passes
from edgec.train.trace import coded_copy, layer_weights, trace


def _net(alpha: float = 1.0, seed: int = 0):
    """Conv → PRelu → depthwise Conv → Flatten → Gemm → Softmax: the layout pass folds the
    channels-last Flatten into the Gemm's rows, the Conv rules transpose OIHW."""
    g = GraphBuilder(seed=seed)
    x = g.op("Conv", ["x", g.weight(8, 2, 3, 3), g.weight(8)], name="conv", pads=[1, 1, 1, 1])
    x = g.op("PRelu", [x, g.const(np.full((8, 1, 1), 0.1, np.float32))], name="prelu")
    x = g.op("Conv", [x, g.weight(8, 1, 3, 3), g.weight(8)], name="depthwise", group=8, strides=[2, 2], pads=[1, 1, 1, 1])
    x = g.op("Flatten", [x])
    x = g.op("Gemm", [x, g.weight(4, 8 * 3 * 3, scale=0.1), g.weight(4)], name="fc", transB=1, alpha=alpha)
    y = g.op("Softmax", [x], name="softmax", axis=1)
    return g.model({"x": [1, 2, 6, 6]}, {y: [1, 4]})


def _residual_net():
    """Conv → Relu → Conv → Add (a residual join whose channels prune together) → Flatten → Gemm → Softmax."""
    g = GraphBuilder(seed=4)
    r = g.op("Relu", [g.op("Conv", ["x", g.weight(8, 2, 3, 3), g.weight(8)], name="conv1", pads=[1, 1, 1, 1])])
    x = g.op("Add", [r, g.op("Conv", [r, g.weight(8, 8, 3, 3), g.weight(8)], name="conv2", pads=[1, 1, 1, 1])], name="join")
    x = g.op("Gemm", [g.op("Flatten", [x]), g.weight(4, 8 * 6 * 6, scale=0.05), g.weight(4)], name="fc", transB=1)
    return g.model({"x": [1, 2, 6, 6]}, {g.op("Softmax", [x], axis=1): [1, 4]})


def _lowered(proto):
    model = canonicalize(ir.serde.deserialize_model(proto), {})[0]
    coded, offsets = coded_copy(model)
    codes = layer_weights(to_keras(prepare(coded)[0]).model)
    lowering = to_keras(prepare(model.clone())[0])
    return model, lowering, trace(model, lowering.model, codes, offsets)


def test_trained_weights_go_back_to_onnx_exactly():
    model, lowering, weights = _lowered(_net())
    assert weights.frozen == [] and {t.layer for t in weights.traced} == {"conv", "prelu", "depthwise", "fc"}
    rng = np.random.default_rng(3)
    for layer in lowering.model.layers:  # "training": move every weight
        layer.set_weights([w + rng.standard_normal(w.shape).astype(np.float32) * 0.1 for w in layer.get_weights()])
    assert len(weights.write_back(model, lowering.model)) == 7
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    want = lowering.model(x.transpose(0, 2, 3, 1)).numpy()
    np.testing.assert_allclose(run_ort(to_proto(model), {"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_a_weight_the_rule_computes_is_left_untrained():
    _, _, weights = _lowered(_net(alpha=0.5))  # Keras kernel = alpha * B: not a copy
    assert weights.frozen == ["fc"] and "fc" not in {t.layer for t in weights.traced}


def _samples(proto, count: int, seed: int, labels: bool) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((count, 2, 6, 6)).astype(np.float32)
    arrays = {"x": x}
    if labels:
        arrays["label"] = np.array([run_ort(proto, {"x": s[None]})[0].argmax() for s in x])
    return arrays


def _build(tmp_path, name: str, data: dict, steps=(), net=_net, **finetune):
    source = save(net(), tmp_path)
    np.savez(tmp_path / "data.npz", **data)
    step = Step("finetune", {"data": str(tmp_path / "data.npz"), "epochs": 2, "batch_size": 8} | finetune)
    return build(source, "ort-x86", tmp_path / name, BuildOptions(recipe=[*steps, step], calib=str(tmp_path / "data.npz")))


def test_distillation_without_labels_brings_a_pruned_model_back(tmp_path):
    data = _samples(_net(), 64, seed=1, labels=False)
    result = _build(tmp_path, "distill", data, [Step("prune", {"rate": 0.5, "round_to": 1, "reconstruct": False})],
                    epochs=4, lr=3e-3, mix=1)
    record = result.report["finetune"]
    assert (record["samples"], record["validation_samples"]) == (2 * 58, 6)  # a blend per training sample
    assert record["labeled"] is False and record["metric"] == "min_output_cosine"
    assert record["heads"] == [{"name": result.report["model"]["outputs"][0]["name"], "kind": "softmax"}]
    assert record["after"] > record["before"] and len(record["losses"]) == record["epochs"]
    assert {"model.finetuned.onnx", "report.html"} <= set(listing(tmp_path / "distill"))
    html = (tmp_path / "distill" / "report.html").read_text()
    assert "Fine-tuning" in html and "<svg" in html and "distillation from the source model" in html


def test_labeled_builds_are_deterministic(tmp_path):
    data = _samples(_net(), 24, seed=2, labels=True)
    first, second = (_build(tmp_path, name, data) for name in ("a", "b"))
    assert first.report["finetune"]["labeled"] and first.report["finetune"]["metric"] == "top1"
    for file in ("model.finetuned.onnx", "model.onnx"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert json.dumps(first.report["finetune"]) == json.dumps(second.report["finetune"])


def test_clustering_leaves_each_kernel_few_values(tmp_path):
    result = _build(tmp_path, "clustered", _samples(_net(), 16, seed=6, labels=False), clusters=4, epochs=1)
    model = onnx.load(tmp_path / "clustered" / "model.finetuned.onnx")
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values = {n.name: len(np.unique(weights[n.input[1]])) for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert values == {"conv": 4, "depthwise": 4, "fc": 4}  # depthwise kernels too, unlike TFMOT's registry
    assert result.report["finetune"]["options"]["clusters"] == 4


@pytest.mark.parametrize("data, options, error, words", [
    ({"y": np.zeros((4, 2, 6, 6), np.float32)}, {}, InputDataError, "'x'"),
    ({"x": np.zeros((4, 2, 6, 6), np.float32), "label": np.array([0, 1, 2, 9])}, {}, InputDataError, "[0, 4)"),
    ({"x": np.zeros((4, 2, 6, 6), np.float32)}, {"budget_s": 1e-6}, EdgecError, "too small for one epoch"),
    ({"x": np.zeros((4, 2, 6, 6), np.float32)}, {"epochs": 0}, OptionError, "epochs (--epochs)"),
])
def test_user_errors(tmp_path, data, options, error, words):
    with pytest.raises(error, match=None) as caught:
        _build(tmp_path, "bad", data, **options)
    assert words in str(caught.value)
    assert listing(tmp_path / "bad") == []


def test_options_are_checked_before_any_work():
    with pytest.raises(OptionError, match=r"lr \(--lr\) must be greater than 0"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "lr": 0})])
    with pytest.raises(RecipeError, match="no option"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "epoch": 3})])


def test_training_steps_run_only_in_builds():
    with pytest.raises(RecipeError, match="only a build"):
        make_passes([Step("finetune", {"data": "x.npz"})], calibration=lambda: None)


def test_command_line_shows_each_epoch(tmp_path):
    np.savez(tmp_path / "data.npz", **_samples(_net(), 16, seed=5, labels=False))
    result = CliRunner().invoke(app, ["build", str(save(_net(), tmp_path)), "-t", "ort-x86", "-o", str(tmp_path / "out"),
                                      "--finetune", str(tmp_path / "data.npz"), "--epochs", "2", "--lr", "1e-3",
                                      "--batch-size", "4", "--finetune-budget-s", "600", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["finetune"]["options"]["lr"] == 1e-3 and report["finetune"]["options"]["batch_size"] == 4
    assert "epoch   1/2" in result.output and "model.finetuned.onnx" in listing(tmp_path / "out")


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from edgec.train.loop import LoopSettings

    settings = LoopSettings(epochs=4, lr=1e-2, batch_size=8, budget_s=10.0, patience=2, temperature=2.0, distill_weight=1.0,
                            seed=0, schedule="cosine", warmup=0.25)
    assert settings.rate(0, 40) == pytest.approx(1e-3) and settings.rate(10, 40) == pytest.approx(1e-2)  # 10 steps warm up
    assert settings.rate(25, 40) < 1e-2 and settings.rate(40, 40) == pytest.approx(0.0, abs=1e-12)
    assert dataclasses.replace(settings, schedule="constant").rate(25, 40) == 1e-2
    assert settings.planned_epochs(1, 4.0, 4.0) == 2 and settings.planned_epochs(1, 1.0, 1.0) == 4  # as many as the budget fits
    assert settings.planned_epochs(2, 9.0, 4.0) == 2  # the next epoch would overrun: stop


def test_augmented_copies_move_images_and_stay_in_range():
    from edgec.train.data import _augmented

    rng = np.random.default_rng(0)
    batches = [{"x": rng.uniform(-1, 1, (1, 2, 8, 8)).astype(np.float32), "n": np.ones(3, np.int64)} for _ in range(3)]
    copies, origin = _augmented(batches, np.array([0, 2]), 2, {"x": (2, 3)}, flip=True, rng=rng)
    assert list(origin) == [0, 2, 0, 2] and all(c["n"] is batches[o]["n"] for c, o in zip(copies, origin))
    for copy, o in zip(copies, origin):
        image, source = copy["x"], batches[o]["x"]
        assert image.dtype == np.float32 and image.shape == source.shape and not np.array_equal(image, source)
        assert source.min() <= image.min() and image.max() <= source.max()


def test_augmentation_and_schedule_in_a_build(tmp_path):
    result = _build(tmp_path, "augmented", _samples(_net(), 20, seed=7, labels=False), augment=2, schedule="cosine", warmup=0.1)
    record = result.report["finetune"]
    assert record["samples"] == 3 * 18 and record["options"]["augment"] == 2 and record["options"]["schedule"] == "cosine"


def test_gradual_pruning_reaches_its_sparsity_and_goes_back_to_onnx(tmp_path):
    result = _build(tmp_path, "sparse", _samples(_net(), 24, seed=8, labels=False), sparsity=0.6, epochs=3, lr=1e-3)
    record = result.report["finetune"]
    model = onnx.load(tmp_path / "sparse" / "model.finetuned.onnx")
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kernels = [weights[n.input[1]] for n in model.graph.node if n.name in ("conv", "fc")]  # depthwise kernels stay dense
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert record["sparsity"] == pytest.approx(0.6, abs=0.02) and zeros == pytest.approx(record["sparsity"], abs=1e-6)
    assert record["best_epoch"] >= 2  # epochs before the final sparsity are never kept


def test_pruning_and_clustering_are_one_or_the_other():
    with pytest.raises(OptionError, match="not both"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "sparsity": 0.5, "clusters": 8})])


def test_a_pruned_stage_output_is_matched_channel_by_channel():
    from edgec.train.features import _match

    teacher = np.random.default_rng(0).standard_normal((50, 4, 4, 6)).astype(np.float32)
    student = teacher[..., [4, 1, 3]] * 0.9 + 0.01  # three channels kept, in another order, a little off
    assert list(_match(student, teacher)) == [4, 1, 3]


def test_feature_distillation_trains_on_the_residual_join(tmp_path):
    data = _samples(_residual_net(), 32, seed=9, labels=False)
    prune = Step("prune", {"rate": 0.5, "round_to": 1, "reconstruct": False})
    result = _build(tmp_path, "features", data, [prune], net=_residual_net, features=1.0, epochs=2, lr=3e-3)
    record = result.report["finetune"]
    assert len(record["features"]) == 1 and record["heads"] == [{"name": result.report["model"]["outputs"][0]["name"], "kind": "softmax"}]
    assert record["after"] >= record["before"] and len(record["losses"]) == 2


@pytest.mark.parametrize("net, gated", [(_residual_net, ["conv1", "conv2"]), (_net, ["conv"])])
def test_channel_gates_fold_into_the_weights_exactly(net, gated):
    """A gate per channel class, at the producers only: conv1 and conv2 feed one residual
    join and share gates; the depthwise conv after ``conv`` carries its channels, gated once.
    Folded into kernels and biases, the gates give the ONNX model what the gated Keras model gave."""
    from edgec.train.gates import ChannelGates

    model, lowering, weights = _lowered(net())
    gates = ChannelGates(model, lowering, penalty=1.0, steps=1)
    assert gates.report()["gates"] == 8 and [g.layer.name for g in gates.gated] == gated  # fc's channels reach the output
    assert all(np.array_equal(g.index, gates.gated[0].index) for g in gates.gated)
    gates.variable.assign(np.random.default_rng(5).uniform(0.0, 0.15, 8).astype(np.float32))
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6)).astype(np.float32)
    gates.before_forward()
    want = lowering.model(x.transpose(0, 2, 3, 1)).numpy()
    gates.fold()
    assert [w.name for w in lowering.model.get_layer(gated[0]).weights] == [f"{gated[0]}/kernel:0", f"{gated[0]}/bias:0"]
    weights.write_back(model, lowering.model)
    np.testing.assert_allclose(run_ort(to_proto(model), {"x": x})[0], want, rtol=1e-5, atol=1e-6)


def test_pruning_by_learned_gates(tmp_path):
    np.savez(tmp_path / "data.npz", **_samples(_residual_net(), 48, seed=10, labels=False))
    result = CliRunner().invoke(app, ["build", str(save(_residual_net(), tmp_path)), "-t", "ort-x86", "-o", str(tmp_path / "out"),
                                      "--prune", "rate=0.5,round_to=1,importance=gates,gate_epochs=3,gate_penalty=5.0",
                                      "--finetune", str(tmp_path / "data.npz"), "--epochs", "1", "--lr", "3e-3",
                                      "--batch-size", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert "channel gates epoch   3/3" in result.output and "\n  epoch   1/1" in result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    passes = [p for p in report["passes"] if p["name"] in ("finetune", "channel-pruning")]
    assert [p["name"] for p in passes] == ["finetune", "channel-pruning", "finetune"]
    learned, pruned, tuned = (p["details"] for p in passes)
    assert learned["options"]["gates"] == 5.0 and learned["epochs"] == 3 and learned["best_epoch"] == 3  # only the last counts
    assert learned["gates"]["gates"] == 8 and learned["gates"]["median"] < 1.0  # the penalty pulled them down
    assert (pruned["importance"], pruned["scope"]) == ("gates", "global")
    assert tuned["options"]["gates"] is None and report["finetune"] == tuned


def test_gates_need_training_data_and_a_step_of_their_own(tmp_path):
    with pytest.raises(RecipeError, match="no finetune step after it"):
        BuildOptions(recipe=[Step("prune", {"rate": 0.5, "importance": "gates"})])
    result = CliRunner().invoke(app, ["build", str(save(_net(), tmp_path)), "-t", "ort-x86", "-o", str(tmp_path / "out"),
                                      "--prune", "rate=0.5,importance=gates"])
    assert result.exit_code == 2 and "--finetune DATA" in result.output and "Traceback" not in result.output
    with pytest.raises(OptionError, match="cannot be combined"):
        BuildOptions(recipe=[Step("finetune", {"data": "x.npz", "gates": 1.0, "sparsity": 0.5})])
