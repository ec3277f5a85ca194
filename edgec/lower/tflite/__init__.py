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
from edgec.lower.tflite.convert import add_metadata, float_op_histogram, keras_to_tflite, op_histogram
from edgec.lower.tflite.keras_builder import KerasLowering, to_keras
from edgec.passes.canonicalize import cleanup_passes
from edgec.passes.decompose import DecomposeBatchNorm
from edgec.passes.fuse import FuseGelu
from edgec.passes.layout import ChannelsLast
from edgec.passes.pipeline import Pipeline
from edgec.runtime.litert import IO_METADATA
from edgec.targets import Target

__all__ = ["lower", "prepare", "to_keras", "KerasLowering"]


def prepare(model: ir.Model) -> tuple[ir.Model, list]:
    """The ONNX passes that put a canonical model into the form the Keras rules expect."""
    return Pipeline([FuseGelu(), DecomposeBatchNorm(), ChannelsLast(), *cleanup_passes()])(model)


def lower(model: ir.Model, target: Target, stem: str, options: LowerOptions) -> Lowered:
    model, records = prepare(model)
    keras_lowering = to_keras(model, target.name)
    io = keras_lowering.io
    representative = [_keras_inputs(sample, io) for sample in options.calibration]
    content = keras_to_tflite(keras_lowering.model, target.name, options.precision, representative, options.int8_io)
    content = add_metadata(content, IO_METADATA, json.dumps(io, sort_keys=True).encode())
    details = {
        "precision": options.precision,
        "passes": [r.to_dict() for r in records],
        "io": io,
        "keras_layers": len(keras_lowering.model.layers),
        "tflite_ops": op_histogram(content),
    }
    if options.precision == "int8":
        details["float_ops"] = float_op_histogram(content)
    return Lowered({f"{stem}.tflite": content}, f"{stem}.tflite", details)


def _keras_inputs(sample: dict[str, np.ndarray], io: dict) -> list[np.ndarray]:
    """One calibration sample, from source names and layout to the Keras model's inputs."""
    return [np.ascontiguousarray(sample[entry["name"]].transpose(entry["perm"])) for entry in io["inputs"]]
