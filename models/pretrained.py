"""Real pretrained production models from a package registry.

The PyPI wheel ``mediapipe==0.10.14`` ships Google's TFLite models under ``mediapipe/modules``
(Apache-2.0). They are converted to ONNX with tf2onnx, which is how TFLite models reach ONNX
in the wild: NHWC inputs, Transposes around convs, PRelu, Pad, multi-output heads. The
original ``.tflite`` is kept beside each ONNX file so later work can compare round trips.

Fetching the wheel is the only network use in the zoo, and happens only in ``make zoo``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tf2onnx
from ai_edge_litert.interpreter import Interpreter

from tf2onnx_fixes import convert_tflite

WHEEL = "mediapipe==0.10.14"
# zoo name → (path inside the wheel, task, input value range of an RGB image). The ranges are
# those MediaPipe's graphs feed (ImageToTensorCalculator's output_tensor_float_range):
# [-1, 1] for the face detector, [0, 1] for the others.
# (pose_detection is left out: tf2onnx mis-reads its weights.)
MODELS = {
    "blazeface": ("mediapipe/modules/face_detection/face_detection_short_range.tflite", "detection", (-1.0, 1.0)),
    "face_landmark": ("mediapipe/modules/face_landmark/face_landmark.tflite", "landmarks", (0.0, 1.0)),
    "selfie_segmentation": ("mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite", "segmentation", (0.0, 1.0)),
    "hand_recrop": ("mediapipe/modules/holistic_landmark/hand_recrop.tflite", "landmarks", (0.0, 1.0)),
    "palm_detection": ("mediapipe/modules/palm_detection/palm_detection_lite.tflite", "detection", (0.0, 1.0)),
}


def convert(tflite: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(tflite)
        # from_tflite + a handler for MediaPipe's custom Convolution2DTransposeBias op
        # (selfie_segmentation) + byte-reproducible output; see tf2onnx_fixes.py.
        proto = convert_tflite(str(path), opset=17)
    proto.producer_version = tf2onnx.__version__
    return proto.SerializeToString()


def max_difference(tflite: bytes, onnx_bytes: bytes, seed: int = 0) -> float:
    """Largest |ONNX Runtime − LiteRT| / max|LiteRT| over all outputs on one seeded random input."""
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for detail, arg in zip(interpreter.get_input_details(), session.get_inputs()):
        x = rng.uniform(-1, 1, detail["shape"]).astype(np.float32)
        interpreter.set_tensor(detail["index"], x)
        feeds[arg.name] = x
    interpreter.invoke()
    want = sorted((d["name"], interpreter.get_tensor(d["index"])) for d in interpreter.get_output_details())
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    if set(got) != {name for name, _ in want}:
        raise ValueError(f"tf2onnx renamed outputs: {sorted(got)}")
    return max(float(np.abs(got[name] - value).max() / max(np.abs(value).max(), 1e-12)) for name, value in want)


def io_shapes(onnx_bytes: bytes) -> tuple[list[dict], list[dict]]:
    proto = onnx.load_from_string(onnx_bytes)
    describe = lambda v: {"name": v.name, "shape": [d.dim_value for d in v.type.tensor_type.shape.dim]}  # noqa: E731
    return [describe(v) for v in proto.graph.input], [describe(v) for v in proto.graph.output]
