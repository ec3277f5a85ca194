"""Magnitude pruning: per-layer and global unstructured sparsity, N:M, which layers stay
dense, the error record, schedules and option errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, random_feeds, run_ort

from edgec.errors import RecipeError
from edgec.model import to_proto
from edgec.passes.sparsify import ConstantSparsity, MagnitudeSparsity, PolynomialDecay, SparsifyOptions
from edgec.recipe import Step, make_passes
from edgec.verify import InputSet

X = "x"


def _net() -> onnx.ModelProto:
    b = GraphBuilder(seed=2)
    h = b.op("Relu", [b.op("Conv", [X, b.weight(8, 4, 3, 3), b.weight(8)], pads=[1, 1, 1, 1])])
    h = b.op("Relu", [b.op("Conv", [h, b.weight(16, 8, 3, 3, scale=1.0)], pads=[1, 1, 1, 1])])
    h = b.op("Conv", [h, b.weight(16, 16, 1, 1, scale=0.1)])
    out = b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [h])]), b.weight(16, 4)])
    return b.model({X: [1, 4, 6, 6]}, {out: None})


def _calibration() -> InputSet:
    rng = np.random.default_rng(7)
    return InputSet([{X: rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)], "random")


def _sparsify(proto: onnx.ModelProto, **options):
    (step,) = make_passes([Step("sparsify", options)], _calibration)
    result = step(ir.serde.deserialize_model(proto))
    weights = {n.name: n.inputs[1].const_value.numpy() for n in result.model.graph if n.op_type in ("Conv", "Gemm")}
    return result, weights


def test_per_layer_sparsity_zeroes_the_smallest_weights_of_each_layer():
    proto = _net()
    result, weights = _sparsify(proto, sparsity=0.5, min_size=0, keep_first_last=False)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dense, sparse = before[node.input[1]], weights[node.name]
            assert np.mean(sparse == 0) == pytest.approx(0.5, abs=1 / dense.size)
            assert np.abs(dense[sparse == 0]).max() <= np.abs(dense[sparse != 0]).min()
    assert {row["sparsity"] for row in result.details["layers"]} == {0.5}


def test_global_threshold_ranks_all_layers_together():
    result, weights = _sparsify(_net(), sparsity=0.5, scope="global", min_size=0, keep_first_last=False)
    zeroed_max = max(np.abs(w[w == 0]).max(initial=0) for w in weights.values())
    kept_min = min(np.abs(w[w != 0]).min(initial=np.inf) for w in weights.values())
    assert zeroed_max <= kept_min
    per_layer = {row["layer"]: row["sparsity"] for row in result.details["layers"]}
    assert per_layer["Conv_6"] < 0.5 < per_layer["Conv_9"]  # large weights (scale 1.0) kept, small (0.1) zeroed
    assert result.details["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_of_m_along_input_channels(pattern, n, m):
    _, weights = _sparsify(_net(), pattern=pattern, min_size=0, keep_first_last=False)
    conv = weights["Conv_9"]  # [16 out, 16 in, 1, 1]
    runs = conv.reshape(16, 16 // m, m)
    assert (np.count_nonzero(runs, axis=-1) == n).all()
    gemm = weights["Gemm_13"]  # [16 in, 4 out]: input channels are rows
    assert (np.count_nonzero(gemm.T.reshape(4, 16 // m, m), axis=-1) == n).all()


def test_tiny_first_and_last_layers_stay_dense_unless_named():
    result, _ = _sparsify(_net(), sparsity=0.5)
    skipped = {s["layer"]: s["reason"] for s in result.details["skipped"]}
    assert "first or last" in skipped["Conv_3"] and "first or last" in skipped["Gemm_13"]
    assert "min_size" in skipped["Conv_9"]
    assert [row["layer"] for row in result.details["layers"]] == ["Conv_6"]
    named, _ = _sparsify(_net(), sparsity=0.5, include=["Conv_3"])
    assert [row["layer"] for row in named.details["layers"]] == ["Conv_3"]


def test_recorded_error_is_the_layers_own_output_error():
    b = GraphBuilder(seed=4)
    out = b.op("Conv", [X, b.weight(6, 4, 3, 3)], pads=[1, 1, 1, 1])
    proto = b.model({X: [1, 4, 6, 6]}, {out: None})
    result, _ = _sparsify(proto, sparsity=0.6, min_size=0, include=["*"])
    sparse = to_proto(result.model)
    batches = _calibration().batches
    dense_out = np.concatenate([run_ort(proto, f)[0] for f in batches])
    sparse_out = np.concatenate([run_ort(sparse, f)[0] for f in batches])
    expected = np.linalg.norm(dense_out - sparse_out) / np.linalg.norm(dense_out)
    assert result.details["layers"][0]["output_error"] == pytest.approx(expected, rel=1e-4)
    onnx.checker.check_model(sparse, full_check=True)
    assert run_ort(sparse, random_feeds(sparse))[0].shape == (1, 6, 6, 6)


def test_schedules_follow_tfmot():
    constant = ConstantSparsity(0.5, begin_step=10, frequency=5)
    assert (constant.sparsity(9), constant.sparsity(10), constant.sparsity(10_000)) == (0.0, 0.5, 0.5)
    assert constant.prunes_at(15) and not constant.prunes_at(16)
    decay = PolynomialDecay(0.8, begin_step=0, end_step=100, initial=0.2, power=3)
    assert decay.sparsity(0) == pytest.approx(0.2)
    assert decay.sparsity(50) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5 ** 3)
    assert decay.sparsity(100) == decay.sparsity(500) == pytest.approx(0.8)


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity must be a number in"),
    ({}, "sparsity must be a number in"),
    ({"pattern": "4:2"}, "pattern must be"),
    ({"pattern": "2:4", "sparsity": 0.3}, "fixes the sparsity"),
    ({"sparsity": 0.3, "scope": "everywhere"}, "scope must be one of"),
])
def test_bad_options_are_recipe_errors(options, message):
    with pytest.raises(RecipeError, match=message):
        make_passes([Step("sparsify", options)], _calibration)


def test_nothing_left_to_sparsify_is_an_error():
    with pytest.raises(RecipeError, match="no layer is left"):
        _sparsify(_net(), sparsity=0.5, min_size=10**6)
    with pytest.raises(RecipeError, match="matches none"):
        _sparsify(_net(), sparsity=0.5, exclude=["nope"])


def test_pass_is_usable_without_calibration_data():
    result = MagnitudeSparsity(SparsifyOptions(sparsity=0.3, min_size=0))(ir.serde.deserialize_model(_net()))
    assert all(row["output_error"] is None for row in result.details["layers"])
