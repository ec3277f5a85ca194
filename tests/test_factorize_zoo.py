"""The zoo, factorized: a 30% total MAC reduction (data-aware, on each model's calibration
split) gives models that pass the checker, lower to every target and verify against the
factorized ONNX. To keep CI short each model is built for one target, rotating through
them, and two models (one CNN, one matrix model) for all four."""

from __future__ import annotations

import onnx
import pytest
from conftest import REPO
from test_zoo import BY_NAME, TARGETS, _options, _path

from edgec.build import build
from edgec.recipe import Step

MODELS = ["mobilenetv2", "resnet", "mobilenetv3", "vgg", "keras_cnn", "unet", "mlp", "transformer"]
EVERY_TARGET = ("vgg", "transformer")
CASES = sorted({(name, target) for name in EVERY_TARGET for target in TARGETS}
               | {(name, TARGETS[i % len(TARGETS)]) for i, name in enumerate(MODELS)})


@pytest.mark.parametrize("name, target", CASES)
def test_factorized_zoo_model_lowers_and_verifies(name, target, tmp_path):
    entry = BY_NAME[name]
    options = _options(entry, calib=str(REPO / entry["calib_data"]),
                       recipe=[Step("factorize", {"mac_reduction": 0.3})])
    result = build(_path(entry), target, tmp_path / "out", options)
    compression = result.report["compression"]
    assert compression["mac_reduction"] >= 0.3, compression["macs"]
    onnx.checker.check_model(onnx.load(tmp_path / "out" / f"{_path(entry).stem}.compressed.onnx"), full_check=True)
    assert result.verification.passed
    record = next(p for p in result.report["passes"] if p["name"] == "factorize")["details"]
    assert record["layers"] and all(r["output_error"]["data_aware"] <= r["output_error"]["plain"] for r in record["layers"].values())
