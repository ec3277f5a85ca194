"""The benchmark's bookkeeping (not its timings: those are only read as same-run ratios)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgec.bench import Bench, _converted
from edgec.profile import compare_latency
from edgec.runtime.litert import LiteRTRunner
from conftest import REPO


def test_round_trip_row_compares_the_original_tflite_with_edgecs(tmp_path):
    bench = Bench(tmp_path, runs=2)
    entry = next(e for e in bench.zoo if e["name"] == "hand_recrop")
    row = bench.round_trip_row(entry)
    converted = ["edgec", "plain_tf2onnx"] if importlib.util.find_spec("tf2onnx") else ["edgec"]  # tf2onnx: the zoo extra
    assert set(row["latency_ms"]) == {"original", *converted}
    assert all(len(r["round_medians_ms"]) == 10 for r in row["latency_ms"].values())  # new instances each round
    for name in converted:
        low, high = row["spread_vs_original"][name]
        assert 0 < low <= row[f"{name}_vs_original"] <= high
    assert (tmp_path / "hand_recrop" / "tflite-x86-fp32" / "hand_recrop.tflite").is_file()
    assert "plain_tf2onnx" in converted or "tf2onnx is not installed" in row["plain_tf2onnx_error"]
    assert len(bench.built) == 1  # a second section asking for the same build reuses it
    bench.round_trip_row(entry)
    assert len(bench.built) == 1


def test_compare_latency_alternates_rounds_and_keeps_the_quietest():
    runner = LiteRTRunner(REPO / "models" / "pretrained" / "hand_recrop.tflite", threads=1)
    made = []

    def fresh() -> LiteRTRunner:
        made.append(LiteRTRunner(REPO / "models" / "pretrained" / "hand_recrop.tflite", threads=1))
        return made[-1]

    result = compare_latency({"a": runner, "b": fresh}, runs=2, rounds=3)
    assert len(result["a"]["round_medians_ms"]) == len(result["b"]["round_medians_ms"]) == 3
    assert result["a"]["best_median_ms"] == min(result["a"]["round_medians_ms"])
    assert len(made) == 3  # a factory gives a new instance every round


def test_a_model_converts_only_if_every_row_of_it_did():
    rows = [{"model": "a", "converts": True}, {"model": "a", "converts": False}, {"model": "b", "converts": True}]
    assert _converted(rows) == "1/2"


def test_factorization_row_reports_accuracy_and_latency_of_both_fits(tmp_path):
    bench = Bench(tmp_path, runs=2)
    row = bench.factorization_row(next(e for e in bench.zoo if e["name"] == "mlp"))
    assert set(row["latency_ms"]) == {"unfactorized", "plain", "data_aware"}
    assert min(row["mac_reduction"].values()) >= 0.3
    assert row["top1"]["source"] == pytest.approx(next(e for e in bench.zoo if e["name"] == "mlp")["metrics"]["top1"], abs=1e-6)
    assert row["top1"]["data_aware"] >= row["top1"]["plain"]


def test_pruning_row_times_pruned_against_unpruned_and_reads_accuracy(tmp_path):
    bench = Bench(tmp_path, runs=2)
    row = bench.pruning_row(next(e for e in bench.zoo if e["name"] == "mlp"))
    assert set(row["latency_ms"]) == {"unpruned", "pruned", "pruned_no_reconstruction", "sparse_50"}
    assert row["pruned"]["mac_reduction"] >= 0.3 and row["pruned"]["size_bytes"] < row["unpruned"]["size_bytes"]
    assert row["sparse_50"]["deflated_bytes"] < row["unpruned"]["deflated_bytes"]
    assert 0.9 < row["pruned"]["top1"] <= 1.0


def test_build_time_row_times_each_stage_of_a_build_in_its_own_process(tmp_path):
    bench = Bench(tmp_path, runs=2)
    row = bench.build_time_row(next(e for e in bench.zoo if e["name"] == "mlp"), "ort-x86", "int8")
    assert row["passed"] and row["shipped"] in ("int8", "fp32")
    stages = [s["stage"] for s in row["stages"]]
    assert stages[0].startswith("Loading") and any(s.startswith("Verifying") for s in stages)
    assert sum(s["seconds"] for s in row["stages"]) <= row["build_seconds"] + 0.05 <= row["wall_seconds"] + 0.05
    assert row["cpu_seconds"] > 0 and row["peak_rss_mb"] > 100  # the child's own: ORT and numpy alone take more
    assert (tmp_path / "mlp" / "ort-x86-int8-timed" / "report.json").is_file()


@pytest.mark.parametrize(("model", "shape"), [("mobilenetv2", (1, 32, 32, 1)), ("blazeface", (1, 128, 3, 128))])
def test_onnx2tf_calibration_comes_in_the_order_onnx2tf_reads_4d_inputs(tmp_path, model, shape):
    """onnx2tf takes a 4-D input for NCHW whatever it is: an NCHW digit and an NHWC photo
    input alike are transposed (0, 2, 3, 1); photo folders are read at the model's input range."""
    bench = Bench(tmp_path, runs=1)
    entry = next(e for e in bench.zoo if e["name"] == model)
    (name, path), = bench._nhwc_calib(entry).items()
    array = np.load(path)
    assert name == entry["inputs"][0]["name"] and array.shape[1:] == shape[1:] and array.shape[0] > 1
    low, high = entry.get("input_range", (array.min(), array.max()))  # photos: read at the model's range
    assert low <= array.min() < array.max() <= high
