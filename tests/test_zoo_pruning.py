"""Channel pruning on the zoo's CNNs: 30% of the MACs removed, the pruned model valid and
lowered, verified against the pruned ONNX; trained classifiers keep their held-out top-1
within one point thanks to reconstruction on the calibration split.

Cost control (~3 min on 2 cores): two models (an NCHW PyTorch net, the NHWC tf2onnx one) go
to all four targets, the other digits CNNs and one production model to tflite-x86 (the
stricter lowering), the remaining production models to ort-x86 (their TFLite builds take
20-60 s each).
"""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import REPO

from edgec.build import BuildOptions, build
from edgec.images import ImagePreprocess
from edgec.recipe import Step
from edgec.targets import known_targets

ZOO = {e["name"]: e for e in json.loads((REPO / "models" / "zoo.json").read_text())}
CNNS = sorted(name for name, e in ZOO.items() if name not in ("mlp", "transformer") and not e.get("large"))
ALL_TARGETS = ("mobilenetv3", "keras_cnn")
ORT_ONLY = ("blazeface", "face_landmark", "palm_detection", "selfie_segmentation")
CASES = [
    (name, target) for name in CNNS
    for target in (known_targets() if name in ALL_TARGETS else ["ort-x86"] if name in ORT_ONLY else ["tflite-x86"])
]
MAC_REDUCTION = 0.3
# ORT x86's blocked-layout kernels ("all" optimizations) move the pruned selfie_segmentation
# mask against the unoptimized reference ("extended": 0.0) by 1.6e-4 of its range on an AVX2
# host and by 3.1e-4 on an AVX-512 one (the same build on both; cosine 1.0000): arithmetic.
TOLERANCE = {"selfie_segmentation": 5e-4}


@pytest.mark.parametrize("name, target", CASES)
def test_pruned_zoo_cnn_lowers_and_verifies(name, target, tmp_path):
    entry = ZOO[name]
    images = ImagePreprocess(tuple(entry.get("input_range", (0.0, 1.0))))
    options = BuildOptions(
        inputs=str(REPO / entry["eval_data"]) if entry["eval_data"] else None,
        calib=str(REPO / entry["calib_data"]), images=images,
        recipe=[Step("prune", {"mac_reduction": MAC_REDUCTION})], tolerance=TOLERANCE.get(name),
    )
    result = build(REPO / "models" / entry["file"], target, tmp_path / "out", options)
    compression = result.report["compression"]
    assert compression["mac_reduction"] >= MAC_REDUCTION
    assert result.verification.passed
    onnx.checker.check_model(onnx.load(tmp_path / "out" / f"{name}.compressed.onnx"), full_check=True)
    if entry["task"] == "classification":
        logits = compression["vs_source"]["outputs"][0]
        assert logits["accuracy_source"] == pytest.approx(entry["metrics"]["top1"], abs=1e-6)
        assert logits["accuracy_artifact"] >= entry["metrics"]["top1"] - 0.01
