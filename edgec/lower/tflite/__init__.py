"""TFLite lowering owned by edgec: fuse → channels-last layout pass → Keras → TFLite.

No third-party ONNX→TF converter sits in this path. The layout is decided by an ONNX pass
(``edgec.passes.layout``) that is exact by construction; each ONNX op then maps to Keras by a
small rule (``edgec.lower.tflite.ops``); TensorFlow's own converter emits the flatbuffer.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir

from edgec.quiet import import_tensorflow

import_tensorflow()  # before any module below imports it, so its start-up noise is muted

# ruff: noqa: E402

from edgec.lower import Lowered, LowerOptions
from edgec.lower.tflite.convert import add_metadata, float_op_histogram, keras_to_tflite, op_histogram, quantize_calibrated
from edgec.lower.tflite.keras_builder import KerasLowering, to_keras
from edgec.passes.canonicalize import cleanup_passes
from edgec.passes.decompose import DecomposeBatchNorm
from edgec.passes.fuse import FuseGelu
from edgec.passes.layout import ChannelsLast
from edgec.passes.pipeline import Pipeline
from edgec.runtime.litert import IO_METADATA, LiteRTRunner
from edgec.targets import Target

__all__ = ["lower", "prepare", "to_keras", "KerasLowering"]

MAX_PLACEMENT_ROUNDS = 3  # keeping an op float can expose another one XNNPACK leaves out
# Never kept float: the MAC kernels int8 is for, and the float↔int8 conversions at the edges.
ALWAYS_INT8 = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "QUANTIZE", "DEQUANTIZE"}


def prepare(model: ir.Model) -> tuple[ir.Model, list]:
    """The ONNX passes that put a canonical model into the form the Keras rules expect."""
    return Pipeline([FuseGelu(), DecomposeBatchNorm(), ChannelsLast(), *cleanup_passes()])(model)


def lower(model: ir.Model, target: Target, stem: str, options: LowerOptions) -> Lowered:
    model, records = prepare(model)
    keras_lowering = to_keras(model, target.name)
    io = keras_lowering.io
    representative = [_keras_inputs(sample, io) for sample in options.calibration.batches]
    content = keras_to_tflite(keras_lowering.model, target.name, options.precision, representative)
    details: dict = {}
    if options.precision == "int8":
        content, details = _int8(content, target, options)
    content = add_metadata(content, IO_METADATA, json.dumps(io, sort_keys=True).encode())
    details = {
        "precision": options.precision,
        "passes": [r.to_dict() for r in records],
        "io": io,
        "keras_layers": len(keras_lowering.model.layers),
        "tflite_ops": op_histogram(content),
        **details,
    }
    return Lowered({f"{stem}.tflite": content}, f"{stem}.tflite", details)


def _int8(calibrated: bytes, target: Target, options: LowerOptions) -> tuple[bytes, dict]:
    """Quantize, then keep float every op type XNNPACK would leave out of its int8 graph
    (except the MAC kernels, which are what int8 is for).

    An op XNNPACK cannot run in int8 (PRELU, HARD_SWISH, LOGISTIC... depending on the
    version) splits the model into partitions with reference kernels between them, which
    made int8 up to 7× slower than fp32 here. Which ops those are is measured by loading
    the file in LiteRT, not listed by hand; as float ops XNNPACK runs them inside one graph.
    """
    kept: set[str] = set()
    content = quantize_calibrated(calibrated, target.name, options.int8_io)
    for _ in range(MAX_PLACEMENT_ROUNDS):
        left_out = set(_placement(content)["outside_delegate"]) - ALWAYS_INT8 - kept
        if not target.runtime.get("xnnpack", True) or not left_out:
            break
        kept |= left_out
        content = quantize_calibrated(calibrated, target.name, options.int8_io, sorted(kept))
    return content, {
        "float_ops": float_op_histogram(content),
        "kept_float_for_xnnpack": sorted(kept),
        "placement": _placement(content),
    }


def _placement(content: bytes) -> dict:
    return LiteRTRunner(content, threads=1, xnnpack=True).placement()


def _keras_inputs(sample: dict[str, np.ndarray], io: dict) -> list[np.ndarray]:
    """One calibration sample, from source names and layout to the Keras model's inputs."""
    return [np.ascontiguousarray(sample[entry["name"]].transpose(entry["perm"])) for entry in io["inputs"]]
