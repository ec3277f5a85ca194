"""Factorization: exact at full rank for every method, rank selection within its budget,
skipped layers untouched, data-aware fits no worse than plain, clear errors, and builds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import GraphBuilder, listing, random_feeds, run_ort, save
from typer.testing import CliRunner

from edgec.analysis import summarize
from edgec.build import BuildOptions, build
from edgec.cli import app
from edgec.errors import RecipeError
from edgec.graph import constant
from edgec.model import check, to_proto
from edgec.passes.factorize import (DECOMPOSITIONS, Candidate, Factorize, FactorizeOptions, InputMoments, _asymmetric_fit, _fit, _layer,
                                    _patch_map, _replace, _RowProducts, _svd_whitened)
from edgec.refit import least_squares, patches
from edgec.recipe import Step, make_passes


def _gemm(g):
    x = g.op("Gemm", ["x", g.weight(12, 24), g.weight(12)], name="layer", transB=1, alpha=0.5, beta=2.0)
    return x, {"x": [3, 24]}


def _gemm_not_transposed(g):
    return g.op("Gemm", ["x", g.weight(24, 12)], name="layer"), {"x": [3, 24]}


def _matmul(g):
    return g.op("MatMul", ["x", g.weight(16, 20)], name="layer"), {"x": [2, 5, 16]}


def _pointwise_strided(g):
    x = g.op("Conv", ["x", g.weight(10, 6, 1, 1), g.weight(10)], name="layer", strides=[2, 1], pads=[1, 0, 0, 1])
    return x, {"x": [1, 6, 7, 8]}


def _kxk(g):
    x = g.op("Conv", ["x", g.weight(10, 6, 3, 3), g.weight(10)], name="layer", strides=[2, 1], pads=[1, 2, 0, 1],
             dilations=[1, 2])
    return x, {"x": [2, 6, 9, 10]}


def _kxk_rectangular(g):
    x = g.op("Conv", ["x", g.weight(5, 4, 3, 2)], name="layer", strides=[1, 2], pads=[2, 0, 1, 1], dilations=[2, 1])
    return x, {"x": [1, 4, 8, 9]}


CASES = [("svd", _gemm), ("svd", _gemm_not_transposed), ("svd", _matmul), ("svd", _pointwise_strided),
         ("tucker2", _kxk), ("tucker2", _kxk_rectangular), ("spatial", _kxk), ("spatial", _kxk_rectangular)]


@pytest.mark.parametrize("method, make", CASES, ids=[f"{m}-{f.__name__[1:]}" for m, f in CASES])
def test_full_rank_factorization_is_exact_and_valid(method, make):
    g = GraphBuilder(seed=1)
    y, inputs = make(g)
    proto = g.model(inputs, {y: None})
    model = ir.serde.deserialize_model(proto)
    node = next(n for n in model.graph if n.name == "layer")
    layer = _layer(node)
    factors = DECOMPOSITIONS[method].factor(layer, DECOMPOSITIONS[method].full_ranks(layer))
    names = _replace(model.graph, layer, method, factors)
    assert names == [f"layer_{method}{i}" for i in range(len(names))] and len(names) == (3 if method == "tucker2" else 2)
    check(model)
    factorized = to_proto(model)
    _assert_declared_shapes_are_inferred(factorized)
    feeds = random_feeds(proto)
    want, got = run_ort(proto, feeds)[0], run_ort(factorized, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert summarize(model)["macs"] == DECOMPOSITIONS[method].macs(layer, DECOMPOSITIONS[method].full_ranks(layer))


def _spatial_7x1(g):
    return g.op("Conv", ["x", g.weight(6, 5, 7, 1)], name="layer", pads=[3, 0, 3, 0]), {"x": [2, 5, 9, 4]}


def _spatial_1x7(g):
    return g.op("Conv", ["x", g.weight(6, 5, 1, 7)], name="layer", pads=[0, 3, 0, 3]), {"x": [2, 5, 4, 9]}


FIT_CASES = CASES + [("spatial", _spatial_7x1), ("spatial", _spatial_1x7)]


def _layer_and_rows(make):
    g = GraphBuilder(seed=1)
    y, inputs = make(g)
    proto = g.model(inputs, {y: None})
    node = next(n for n in ir.serde.deserialize_model(proto).graph if n.name == "layer")
    return _layer(node), patches(node, random_feeds(proto)["x"]).astype(np.float64)


@pytest.mark.parametrize("data", [False, True])
@pytest.mark.parametrize("method, make", FIT_CASES, ids=[f"{m}-{f.__name__[1:]}" for m, f in FIT_CASES])
def test_candidate_errors_from_moments_are_those_of_the_weights_seen_by_the_inputs(method, make, data):
    """Candidates are measured from the layer's moments in the patch map's coordinates; they
    must give what the definition gives: ``ε² = ‖(W − B·M)·root‖² / ‖W·root‖²`` (``root``
    the identity without data), the refit being least squares on ``M·root``."""
    layer, rows = _layer_and_rows(make)
    if data:
        layer = dataclasses.replace(layer, inputs=InputMoments.of(rows.T @ rows / len(rows), len(rows)))
    root = layer.inputs.root if data else np.eye(layer.matrix.shape[1])
    seen = layer.matrix @ root

    def error(factors):
        return np.sum((seen - factors.last @ _patch_map(factors) @ root) ** 2) / np.sum(seen ** 2)

    for ranks in DECOMPOSITIONS[method].ranks(layer, 1):
        fit, plain = _fit(layer, method, ranks), DECOMPOSITIONS[method].factor(layer, ranks)
        assert fit.error == pytest.approx(error(fit.factors), rel=1e-6, abs=1e-12)
        if data:
            refit = dataclasses.replace(plain, last=least_squares((_patch_map(plain) @ root).T, seen.T).T)
            aware = _svd_whitened(layer, ranks) if method == "svd" else refit
            assert fit.errors["plain"] == pytest.approx(error(plain), rel=1e-6, abs=1e-12)
            assert fit.errors["data_aware"] == pytest.approx(error(aware), rel=1e-6, abs=1e-12)


def test_tucker2_core_moments_in_any_order_are_the_core_times_the_map_moments():
    """Core moments grow with r_in from the last ones computed; asked for smaller, again or
    out of order, they must still be ``K·G·Kᵀ`` and ``K·X`` of that r_in's core."""
    layer, rows = _layer_and_rows(_kxk)
    layer = dataclasses.replace(layer, inputs=InputMoments.of(rows.T @ rows / len(rows), len(rows)))
    for r_in in (2, 5, 3, 3, 6, 1, 6):
        mixing = layer.full_core[:, :r_in].reshape(len(layer.full_core), -1)
        gram, cross = layer.map_moments("tucker2", mixing.shape[1])
        got_gram, got_cross = layer.core_moments(r_in)
        np.testing.assert_allclose(got_gram, mixing @ gram @ mixing.T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_cross, mixing @ cross, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method, make", FIT_CASES, ids=[f"{m}-{f.__name__[1:]}" for m, f in FIT_CASES])
def test_asymmetric_refit_is_ridge_least_squares_on_the_rows(method, make):
    """The final fit adds the ridge's rows ``√(n·ridge)·I`` (asking for ``W``) to the normal
    equations instead of stacking them under the data rows: the same solution."""
    layer, rows = _layer_and_rows(make)
    rng = np.random.default_rng(5)
    reached = rows + 0.1 * rng.standard_normal(rows.shape)
    wanted = rows @ layer.matrix.T
    ranks = DECOMPOSITIONS[method].ranks(layer, 1)[0]
    fit = _asymmetric_fit(layer, Candidate(method, ranks, 0, 0.0), reached, wanted)
    moments = InputMoments.of(reached.T @ reached / len(reached), len(reached))
    start = (_svd_whitened(dataclasses.replace(layer, inputs=moments), ranks) if method == "svd"
             else DECOMPOSITIONS[method].factor(layer, ranks))
    prior = np.sqrt(len(reached) * moments.ridge) * np.eye(len(layer.matrix.T))
    inputs, targets = np.vstack([reached, prior]), np.vstack([wanted, prior @ layer.matrix.T])
    expected = least_squares(inputs @ _patch_map(start).T, targets).T
    error = np.sum((reached @ (expected @ _patch_map(start)).T - wanted) ** 2) / np.sum(wanted ** 2)
    assert fit.errors["data_aware"] == pytest.approx(error, rel=1e-6, abs=1e-12)


def test_input_moments_count_every_row_whatever_the_blocks():
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((n, 5)) for n in (2, 1, 4, 3)]
    total = _RowProducts(5)
    for block in blocks:
        total.add(block)
    rows = np.concatenate(blocks)
    moments = total.moments()
    np.testing.assert_allclose(moments.moment - moments.ridge * np.eye(5), rows.T @ rows / len(rows), rtol=1e-12)


def _assert_declared_shapes_are_inferred(proto: onnx.ModelProto) -> None:
    declared = {v.name: v.type for v in proto.graph.value_info}
    inferred = onnx.shape_inference.infer_shapes(_without_value_info(proto), strict_mode=True)
    for value in inferred.graph.value_info:
        assert declared[value.name] == value.type, value.name


def _without_value_info(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.value_info[:]
    return copy


def _net(seed: int = 2) -> onnx.ModelProto:
    """Conv 3x3 → Relu → Conv 1x1 → Relu → depthwise 3x3 → pool → Gemm → Gemm (tiny head)."""
    g = GraphBuilder(seed=seed)
    x = g.op("Relu", [g.op("Conv", ["x", g.weight(24, 8, 3, 3), g.weight(24)], name="conv3", pads=[1, 1, 1, 1])])
    x = g.op("Relu", [g.op("Conv", [x, g.weight(32, 24, 1, 1), g.weight(32)], name="conv1")])
    x = g.op("Conv", [x, g.weight(32, 1, 3, 3), g.weight(32)], name="depthwise", group=32, pads=[1, 1, 1, 1])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    x = g.op("Relu", [g.op("Gemm", [x, g.weight(48, 32), g.weight(48)], name="fc", transB=1)])
    y = g.op("Gemm", [x, g.weight(3, 48), g.weight(3)], name="head", transB=1)
    return g.model({"x": [1, 8, 10, 10]}, {y: [1, 3]})


def _samples(count: int = 8, seed: int = 4) -> list[dict[str, np.ndarray]]:
    """Inputs whose 8 channels mix 2 patterns at every pixel (plus a little noise): a
    20-dimensional subspace of conv3's 72 inputs, which data-aware fits can use."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((2, 8))
    return [{"x": (np.einsum("kc,khw->chw", mixing, rng.standard_normal((2, 10, 10)))[None]
                   + 0.05 * rng.standard_normal((1, 8, 10, 10))).astype(np.float32)} for _ in range(count)]


def _factorize(proto, calibration=None, **options):
    model = ir.serde.deserialize_model(proto)
    result = Factorize(FactorizeOptions(**options), calibration)(model)
    check(result.model)
    return result


@pytest.mark.parametrize("data", [False, True])
@pytest.mark.parametrize("reduction", [0.15, 0.3])
def test_mac_budget_is_respected(reduction, data):
    proto = _net()
    before = summarize(ir.serde.deserialize_model(proto))["macs"]
    result = _factorize(proto, _samples() if data else None, mac_reduction=reduction)
    after = summarize(result.model)["macs"]
    assert after <= (1 - reduction) * before
    assert summarize(result.model)["params"] < summarize(ir.serde.deserialize_model(proto))["params"]
    layers = result.details["layers"]
    assert layers and sum(r["macs"]["before"] - r["macs"]["after"] for r in layers.values()) == before - after
    for record in layers.values():
        assert record["macs"]["after"] < record["macs"]["before"]
        assert all(r % 4 == 0 or r in _full_ranks(proto, record) for r in record["ranks"])


def _full_ranks(proto, record):
    node_name = record["nodes"][0].rsplit("_", 1)[0]
    node = next(n for n in ir.serde.deserialize_model(proto).graph if n.name == node_name)
    layer = _layer(node)
    return DECOMPOSITIONS[record["method"]].full_ranks(layer)


def test_energy_and_layer_reduction_choose_per_layer():
    proto = _net()
    energy = _factorize(proto, energy=0.9).details["layers"]
    assert all(r["weight_error"] <= np.sqrt(0.1) + 1e-4 for r in energy.values())
    halved = _factorize(proto, layer_reduction=0.5).details["layers"]
    assert halved and all(r["macs"]["after"] <= 0.5 * r["macs"]["before"] for r in halved.values())


def test_skipped_layers_are_left_unchanged_with_reasons():
    proto = _net()
    result = _factorize(proto, rank=4, exclude=["conv1"])
    skipped = result.details["skipped"]
    assert skipped["depthwise"] == "grouped or depthwise convolution"
    assert skipped["head"] == "no rank costs fewer MACs than the layer"  # 48→3: rank 4 saves nothing
    assert "conv1" not in skipped and "conv1" not in result.details["layers"]  # excluded: not a candidate
    original = {n.name: constant(n.inputs[1]) for n in ir.serde.deserialize_model(proto).graph if n.op_type in ("Conv", "Gemm")}
    for node in result.model.graph:
        if node.name in ("depthwise", "head", "conv1"):
            np.testing.assert_array_equal(constant(node.inputs[1]), original[node.name])
    assert {n.name for n in result.model.graph} >= {"depthwise", "head", "conv1"}
    assert result.details["layers"]["conv3"]["ranks"] == [4, 4] and result.details["layers"]["fc"]["ranks"] == [4]


def test_data_aware_is_no_worse_than_plain_on_calibration_data():
    proto = _net()
    calibration = _samples()
    layers = _factorize(proto, calibration, mac_reduction=0.3).details["layers"]
    for record in layers.values():
        errors = record["output_error"]
        assert errors["data_aware"] <= errors["plain"]
        assert record["kept"] == "data_aware"
    # Inputs in a subspace: a data-aware fit reproduces the outputs far better.
    assert any(r["output_error"]["data_aware"] < 0.5 * r["output_error"]["plain"] for r in layers.values())
    plain, aware = (_factorize(proto, c, mac_reduction=0.3).model for c in (None, calibration))
    held_out = _samples(count=4, seed=9)
    errors = [_output_error(proto, m, held_out) for m in (plain, aware)]
    assert errors[1] < errors[0], errors


@pytest.mark.parametrize("kernel", [(7, 1), (1, 7), (3, 3)])
def test_spatial_fits_with_data_on_one_sided_kernels(kernel):
    """Inception-v3's 7x1 convs split into a 7x1 and a 1x1: the data-aware fit read that
    as an svd and crashed on mismatched shapes (224 features against 32)."""
    g = GraphBuilder(seed=3)
    kh, kw = kernel
    y = g.op("Conv", ["x", g.weight(16, 8, kh, kw), g.weight(16)], name="layer", pads=[kh // 2, kw // 2] * 2)
    proto = g.model({"x": [1, 8, 10, 10]}, {y: [1, 16, 10, 10]})
    record = _factorize(proto, _samples(), method="spatial", rank=2).details["layers"]["layer"]
    assert record["method"] == "spatial" and record["output_error"]["data_aware"] <= record["output_error"]["plain"]


def _output_error(proto, model, samples) -> float:
    factorized = to_proto(model)
    diffs = [run_ort(factorized, s)[0] - run_ort(proto, s)[0] for s in samples]
    return float(np.sqrt(np.mean(np.square(diffs))))


@pytest.mark.parametrize("options, message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -2}, "rank must be a positive integer"),
    ({"energy": 0.0}, r"energy must be in \(0, 1\]"),
    ({"energy": 1.5}, r"energy must be in \(0, 1\]"),
    ({"mac_reduction": 1.0}, r"mac_reduction must be in \[0, 1\)"),
    ({"layer_reduction": -0.1}, r"layer_reduction must be in \[0, 1\)"),
    ({}, "give exactly one of rank, energy"),
    ({"rank": 4, "energy": 0.9}, "got rank, energy"),
    ({"energy": 0.9, "method": "cp"}, "method must be one of auto, svd, tucker2, spatial"),
    ({"energy": 0.9, "round_to": 0}, "round_to must be a positive integer"),
    ({"energy": 0.9, "ranks": 3}, "no option.*ranks"),
])
def test_bad_options_are_recipe_errors(options, message):
    with pytest.raises(RecipeError, match=message):
        make_passes([Step("factorize", options)], lambda: pytest.fail("calibration loaded for a bad step"))


def test_names_matching_nothing_and_unreachable_budgets_are_errors():
    proto = _net()
    with pytest.raises(RecipeError, match="include pattern 'conv9' matches none"):
        _factorize(proto, energy=0.9, include=["conv9"])
    with pytest.raises(RecipeError, match="cannot remove 90.0% of the model's MACs"):
        _factorize(proto, mac_reduction=0.9)
    with pytest.raises(RecipeError, match="no layer it can change has op type MatMul"):
        _factorize(proto, energy=0.9, op_types=["MatMul"])


def test_data_free_step_never_loads_calibration():
    (step,) = make_passes([Step("factorize", {"energy": 0.9, "data_aware": False})],
                          lambda: pytest.fail("calibration loaded"))
    assert step.calibration is None


def test_cli_factorize_build(tmp_path):
    path = save(_net(), tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(path), "-t", "ort-x86", "-o", str(out),
                                      "--factorize", "mac_reduction=0.15,data_aware=false,method=svd"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    compression = report["compression"]
    assert compression["steps"] == [{"pass": "factorize", "mac_reduction": 0.15, "data_aware": False, "method": "svd"}]
    assert compression["mac_reduction"] >= 0.15
    record = next(p for p in report["passes"] if p["name"] == "factorize")
    assert record["details"]["skipped"]["conv3"] == "method svd does not apply to a KxK layer"
    assert "model.compressed.onnx" in listing(out)


def test_cli_bad_factorize_option_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["build", str(save(_net(), tmp_path)), "-t", "ort-x86", "-o", str(out),
                                      "--factorize", "energy=1.2"])
    assert result.exit_code == 2 and "energy must be in (0, 1]" in " ".join(result.output.split())
    assert listing(out) == []


def test_factorized_model_quantizes_to_int8(tmp_path):
    """factorize → int8 (ORT x86, QDQ): the chain of thin layers quantizes and verifies."""
    path = save(_net(), tmp_path)
    samples = _samples(16)
    options = BuildOptions(recipe=[Step("factorize", {"mac_reduction": 0.3})], precision="int8", speed_check=False,
                           calib=lambda: samples, inputs=None)
    result = build(path, "ort-x86", tmp_path / "out", options)
    assert result.verification.passed
    quantized = result.report["lowering"]["quantization"]["quantized_ops"]
    assert quantized.get("Conv", 0) + quantized.get("Gemm", 0) > 0, quantized


def test_factorization_is_deterministic():
    proto = _net()
    first, second = (to_proto(_factorize(proto, _samples(), mac_reduction=0.3).model).SerializeToString() for _ in range(2))
    assert first == second


def test_fits_on_thinned_rows_stay_no_worse_than_plain(monkeypatch):
    """Layers with many positions are fitted on every k-th im2col row (bounded memory)."""
    from edgec.passes import factorize

    monkeypatch.setattr(factorize, "MAX_FIT_ROWS", 120)
    layers = _factorize(_net(), _samples(), mac_reduction=0.3).details["layers"]
    assert layers and all(r["output_error"]["data_aware"] <= r["output_error"]["plain"] for r in layers.values())


def test_factorize_then_prune_then_int8_gives_a_valid_model(tmp_path):
    """The issue's composition: factorize → prune → quantize (ORT x86 QDQ int8) builds,
    passes the checker and verifies against the compressed model."""
    path = save(_net(), tmp_path)
    samples = _samples(16)
    recipe = [Step("factorize", {"mac_reduction": 0.15}), Step("prune", {"rate": 0.25, "round_to": 4})]
    result = build(path, "ort-x86", tmp_path / "out", BuildOptions(recipe=recipe, precision="int8", speed_check=False,
                                                                   calib=lambda: samples))
    assert result.verification.passed
    passes = {p["name"]: p for p in result.report["passes"]}
    assert passes["factorize"]["modified"] and passes["channel-pruning"]["modified"], passes.keys()
    assert result.report["compression"]["mac_reduction"] > 0.15
    onnx.checker.check_model(onnx.load(tmp_path / "out" / "model.compressed.onnx"), full_check=True)


def test_a_model_with_unnamed_nodes_factorizes(tmp_path):
    """Hand-written graphs and torch.onnx's dynamo exports leave nodes unnamed; their
    factors once shared one name ("_svd0") and ONNX Runtime refused the model."""
    proto = _net()
    for node in proto.graph.node:
        node.name = ""
    options = BuildOptions(recipe=[Step("factorize", {"mac_reduction": 0.3, "data_aware": False})])
    result = build(save(proto, tmp_path), "ort-x86", tmp_path / "out", options)
    assert result.verification.passed and result.report["compression"]["mac_reduction"] >= 0.3


def test_map_moments_are_computed_once_when_the_map_has_fewer_rows_than_asked(monkeypatch):
    """A 3x3 conv with one output has 9 input modes for 16 channels: asking for 16 must not
    recompute the moments at every candidate."""
    from edgec.passes import factorize

    g = GraphBuilder(seed=1)
    y = g.op("Conv", ["x", g.weight(1, 16, 3, 3)], name="layer", pads=[1, 1, 1, 1])
    node = next(n for n in ir.serde.deserialize_model(g.model({"x": [1, 16, 6, 6]}, {y: None})).graph if n.name == "layer")
    layer, calls = _layer(node), []
    original = factorize.Layer._moments_of_map
    monkeypatch.setattr(factorize.Layer, "_moments_of_map", lambda self, *a: calls.append(a) or original(self, *a))
    for _ in range(3):
        gram, cross = layer.map_moments("tucker2", 16 * 9)
    assert len(calls) == 1 and gram.shape == (9 * 9, 9 * 9) and cross.shape == (81, 1)
