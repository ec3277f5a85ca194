"""TFLite lowering owned by edgec: fuse → channels-last layout pass → Keras → TFLite.

No third-party ONNX→TF converter sits in this path. The layout is decided by an ONNX pass
(``edgec.passes.layout``) that is exact by construction; each ONNX op then maps to Keras by a
small rule (``edgec.lower.tflite.ops``); TensorFlow's own converter emits the flatbuffer.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import onnx
import onnx_ir as ir

from edgec.quiet import import_tensorflow

import_tensorflow()  # before any module below imports it, so its start-up noise is muted

# ruff: noqa: E402

from edgec.analysis import int8_coverage, is_quantized, layer_table
from edgec.errors import UnsupportedOpError
from edgec.lower import Lowered, LowerOptions, ahead
from edgec.lower.tflite.convert import (add_metadata, float_op_histogram, integer_ops, keras_to_tflite, op_histogram, op_names,
                                       op_nodes, output_ops as _output_ops, quantize_calibrated)
from edgec.lower.tflite.keras_builder import KerasLowering, to_keras
from edgec.lower.tflite.order import canonical
from edgec.lower.tflite.prelu import shared_slope_prelu_as_leaky_relu
from edgec.lower.tflite.ranges import learned_ranges, refine_ranges, unbounded_ops
from edgec.passes.canonicalize import cleanup_passes
from edgec.passes.decompose import DecomposeBatchNorm
from edgec.passes.fuse import FuseGelu, FuseGroupNorm
from edgec.passes.layout import ChannelsLast
from edgec.passes.pipeline import PassRecord, Pipeline
from edgec.memo import Recent, fingerprint
from edgec.model import to_bytes
from edgec.passes.quantize import CHECK_BATCHES, Candidate, PrecisionSearch, Ranking, calibrate, head
from edgec.runtime import Runner, compare_threads
from edgec.runtime.litert import IO_METADATA, OP_NODES_METADATA, LiteRTRunner
from edgec.runtime.ort import OrtRunner
from edgec.verify import run_all
from edgec.targets import Target

__all__ = ["lower", "convert_ahead", "prepare", "to_keras", "KerasLowering"]

RANGE_SAMPLES = 32  # calibration batches the float model runs on to histogram every tensor
MAX_PLACEMENT_ROUNDS = 3  # keeping an op float can expose another one XNNPACK leaves out
MAC_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV"}
# Never kept float for XNNPACK: the MAC kernels int8 is for, and the float↔int8 conversions at the edges.
ALWAYS_INT8 = MAC_OPS | {"QUANTIZE", "DEQUANTIZE"}


def prepare(model: ir.Model) -> tuple[ir.Model, list]:
    """The ONNX passes that put a canonical model into the form the Keras rules expect."""
    return Pipeline([FuseGelu(), FuseGroupNorm(), DecomposeBatchNorm(), ChannelsLast(), *cleanup_passes()])(model)


@dataclasses.dataclass(frozen=True)
class _Converted:
    """A model through the ONNX passes, Keras and TensorFlow's converter (fp32, fp16, or
    calibrated for int8), with what the rest of the lowering needs to know about it."""

    content: bytes
    records: list
    io: dict
    layers: dict[str, list[str]]
    keras_layers: int
    output_producers: dict[str, str]  # graph output → the node that computes it


# An int8 build converts the model it keeps twice (measuring recovery variants, then with the
# precision search): the conversion is most of a lowering's time, and deterministic.
_CONVERTED: Recent[_Converted] = Recent(2)


def lower(model: ir.Model, target: Target, stem: str, options: LowerOptions) -> Lowered:
    _refuse_quantized(model, target)
    source = to_bytes(model)  # the float reference of int8 checks, and what the conversion is remembered by
    key, arguments = _conversion(source, target, options)
    # A copy: the layout passes edit in place, and the int8 report counts MACs on the model given.
    converted = _CONVERTED.get(key, lambda: ahead.take(key) or _convert(model.clone(), *arguments))
    content, details = converted.content, {}
    if options.precision == "int8":
        content, details = _Int8(content, target, options, converted).build(source, model)
    content = canonical(content)  # one file whatever the exporter's node order; see order.py
    content = add_metadata(content, {IO_METADATA: json.dumps(converted.io, sort_keys=True).encode(),
                                     OP_NODES_METADATA: json.dumps(_op_nodes(content, converted)).encode()})
    details = {
        "precision": options.precision,
        "passes": [r.to_dict() for r in converted.records],
        "io": converted.io,
        "keras_layers": converted.keras_layers,
        "tflite_ops": op_histogram(content),
        **details,
    }
    return Lowered({f"{stem}.tflite": content}, f"{stem}.tflite", details)


def convert_ahead(model: ir.Model, target: Target, options: LowerOptions) -> None:
    """Start the conversion a later ``lower(model, target, _, options)`` needs in the worker
    process (``edgec.lower.lower_ahead``)."""
    if ahead.active():
        source = to_bytes(model)
        key, arguments = _conversion(source, target, options)
        if key not in _CONVERTED:
            ahead.submit(key, _convert_serialized, source, *arguments)


def _conversion(source: bytes, target: Target, options: LowerOptions) -> tuple[str, tuple]:
    """What a conversion is remembered by, and its arguments after the model."""
    calibration = options.calibration.batches if options.precision == "int8" else []
    method = options.scheme.method if options.precision == "int8" else None
    ranges = options.ranges if options.precision == "int8" else ()
    return (fingerprint(source, target.name, options.precision, calibration, method, ranges),
            (target, options.precision, calibration, method, ranges))


def _convert_serialized(source: bytes, *arguments) -> _Converted:
    """``_convert`` of a model given as bytes (in the worker process)."""
    return _convert(ir.serde.deserialize_model(onnx.load_from_string(source)), *arguments)


def _refuse_quantized(model: ir.Model, target: Target) -> None:
    """A quantized ONNX model (dynamic: DynamicQuantizeLinear → ConvInteger/MatMulInteger, or
    QDQ, QLinear*) holds integer ops no Keras layer or TFLite builtin mirrors."""
    found = [node for node in model.graph.all_nodes() if is_quantized(node)]
    if found:
        ops = ", ".join(sorted({node.op_type for node in found}))
        raise UnsupportedOpError(
            found[0].op_type, found[0].name, target=target.name,
            reason=f"the model is already quantized ({ops}), and the TFLite lowering builds from float models only",
            hint="Build the float model it was quantized from (--precision int8 makes a full-integer .tflite of it), "
                 "or build this one for an ONNX Runtime target (--target ort-arm or ort-x86), which runs it as it is.",
        )


def _op_nodes(content: bytes, converted: _Converted) -> list[list[str]]:
    """The source nodes each TFLite op computes (for naming profile rows): those whose Keras
    layers the op's name carries; an op producing a graph output, whose tensor the converter
    names after the signature instead, by the node that produces that output."""
    nodes = op_nodes(op_names(content), converted.layers)
    sources = {entry["key"]: converted.output_producers.get(entry["name"]) for entry in converted.io["outputs"]}
    for op, key in _output_ops(content).items():
        if not nodes[op] and sources.get(key):
            nodes[op] = [sources[key]]
    return nodes


def _convert(model: ir.Model, target: Target, precision: str, calibration: list, method: str | None = None,
             ranges: tuple = ()) -> _Converted:
    model, records = prepare(model)
    keras_lowering = to_keras(model, target.name, loops=precision != "int8")
    representative = [_keras_inputs(sample, keras_lowering.io) for sample in calibration]
    content = keras_to_tflite(keras_lowering.model, target.name, precision, representative)
    if method == "mse":
        named = [dict(zip(keras_lowering.model.input_names, sample)) for sample in representative[:RANGE_SAMPLES]]
        content, record = refine_ranges(content, named)
        records = [*records, PassRecord("activation-ranges", True, 0, 0, {"method": method, **record})]
    if ranges:
        content, record = learned_ranges(content, ranges, keras_lowering, representative[0])
        records = [*records, PassRecord("learned-activation-ranges", True, 0, 0, record)]
    producers = {v.name: v.producer().name for v in model.graph.outputs if v.producer() is not None}
    return _Converted(content, records, keras_lowering.io, keras_lowering.layers, len(keras_lowering.model.layers), producers)


class _Int8:
    """Full-integer TFLite from a calibrated model, and which ops stay float.

    Op types XNNPACK would leave out of its int8 graph stay float (except the MAC kernels,
    which are what int8 is for): an op XNNPACK cannot run in int8 (PRELU, HARD_SWISH...
    depending on the version) splits the model into partitions with reference kernels
    between them, which made int8 up to 7× slower than fp32 here. Which ops those are is
    measured by loading the file in LiteRT, not listed by hand. With an accuracy goal, the
    most sensitive ops also stay float, as few as meet it (``PrecisionSearch``). A PRELU
    XNNPACK leaves out becomes an int8 LEAKY_RELU where its slope is one number.
    """

    def __init__(self, calibrated: bytes, target: Target, options: LowerOptions, lowering: _Converted):
        self.calibrated, self.target, self.options, self.lowering = calibrated, target, options, lowering
        self.prelu_as_leaky_relu = 0  # shared-slope PReLUs run as int8 LEAKY_RELU instead of kept float
        self.unbounded = unbounded_ops(calibrated)  # always float: an infinite range has no int8 scale

    def quantize(self, float_ops: set[str], float_nodes: set[str] = frozenset()) -> bytes:
        return quantize_calibrated(self.calibrated, self.target.name, self.options.int8_io, sorted(float_ops),
                                   sorted(set(float_nodes) | self.unbounded))

    def build(self, source: bytes, model: ir.Model) -> tuple[bytes, dict]:
        float_ops = self._xnnpack_float_ops()
        if "PRELU" in float_ops:
            float_ops = self._prelu_as_leaky_relu(float_ops)
        kept, steps = self._search(source, float_ops, model) if self.options.goal else (set(), [])
        content = self.quantize(float_ops, kept)
        return content, {
            "float_ops": float_op_histogram(content),
            "kept_float_for_xnnpack": sorted(float_ops),
            "prelu_as_leaky_relu": self.prelu_as_leaky_relu,
            "kept_float": len(kept),
            "kept_float_for_infinite_ranges": len(self.unbounded),
            "search": steps,
            "placement": _placement(content),
            "int8_coverage": self._coverage(content, kept, steps, model),
        }

    def _coverage(self, content: bytes, kept: set[str], steps: list, model: ir.Model) -> dict:
        """``int8_coverage`` of the .tflite: a source node runs in int8 when an integer MAC op
        carries its Keras layers; float MAC layers were kept by the search, or have no int8 kernel."""
        names, nodes = op_names(content), _op_nodes(content, self.lowering)
        int8 = {node for computed, integer in zip(nodes, integer_ops(content, MAC_OPS)) if integer for node in computed}
        searched = {node for name, computed in zip(names, nodes) if name in kept for node in computed}
        return {**int8_coverage(model, int8, {node: "precision search" for node in searched}), "all_int8_check": steps[0] if steps else None}

    def _xnnpack_float_ops(self) -> set[str]:
        kept: set[str] = set()
        for _ in range(MAX_PLACEMENT_ROUNDS):
            left_out = set(_placement(self.quantize(kept))["outside_delegate"]) - ALWAYS_INT8 - kept
            if not self.target.runtime.get("xnnpack", True) or not left_out:
                break
            kept |= left_out
        return kept

    def _prelu_as_leaky_relu(self, float_ops: set[str]) -> set[str]:
        """The op types kept float once shared-slope PReLUs are LEAKY_RELUs, if XNNPACK runs
        those in int8; else ``float_ops``, and the PRELUs stay as they were."""
        rewritten, replaced = shared_slope_prelu_as_leaky_relu(self.calibrated)
        if not replaced:
            return float_ops
        original, self.calibrated = self.calibrated, rewritten
        with_leaky_relu = self._xnnpack_float_ops()
        if with_leaky_relu <= float_ops and "LEAKY_RELU" not in with_leaky_relu:
            self.prelu_as_leaky_relu = replaced
            return with_leaky_relu
        self.calibrated = original
        return float_ops

    def _search(self, source: bytes, float_ops: set[str], model: ir.Model) -> tuple[set[str], list]:
        """Rank on the source-layout float model (ORT runs it), check the .tflite itself."""
        check = head(self.options.calibration, CHECK_BATCHES)
        proto = onnx.load_from_string(source)
        ranges = calibrate(proto, check.batches, self.options.scheme)
        reference = run_all(OrtRunner(source, threads=1, optimization="disabled"), check.batches)

        def runner(content: bytes) -> Runner:
            # The io mapping given directly: writing it into each candidate file took seconds.
            return LiteRTRunner(content, threads=compare_threads(".tflite"), xnnpack=self.target.runtime.get("xnnpack", True),
                                io=self.lowering.io)

        search = PrecisionSearch(reference, check, lambda keep: self.quantize(float_ops, keep), runner, self._op_macs(model))
        ranking = functools.cache(lambda: Ranking(proto, ranges, self.options.scheme, check))  # built only if it is needed
        return search.run(self.options.goal, lambda kept: self._op_ranking(ranking()(kept))), search.steps

    def _op_macs(self, model: ir.Model) -> dict[str, int]:
        """Each op of the calibrated model → the MACs of the source nodes it computes."""
        macs = {row["name"]: row["macs"] for row in layer_table(model.graph)}
        names = op_names(self.calibrated)
        return {name: sum(macs.get(node, 0) for node in nodes) for name, nodes in zip(names, op_nodes(names, self.lowering.layers))}

    def _op_ranking(self, ranking: list[Candidate]) -> list[Candidate]:
        """The ONNX ranking in TFLite op names: each candidate's nodes → the Keras layers
        they became → the ops whose names carry them. Ops no candidate reaches come last,
        so the longest prefix keeps everything float and the search always ends."""
        names = op_names(self.calibrated)
        nodes = op_nodes(names, self.lowering.layers)
        taken: set[str] = set()
        ops_ranking = []
        for candidate in ranking:
            ops = {name for name, computed in zip(names, nodes) if name not in taken and set(computed) & set(candidate.nodes)}
            if ops:
                ops_ranking.append(Candidate(candidate.tensor, candidate.gain, tuple(sorted(ops))))
                taken |= ops
        rest = tuple(sorted(set(names) - taken))
        return ops_ranking + ([Candidate("(unmapped ops)", 0.0, rest)] if rest else [])


def _placement(content: bytes) -> dict:
    return LiteRTRunner(content, threads=1, xnnpack=True).placement()


def _keras_inputs(sample: dict[str, np.ndarray], io: dict) -> list[np.ndarray]:
    """One calibration sample, from source names and layout to the Keras model's inputs."""
    return [np.ascontiguousarray(sample[entry["name"]].transpose(entry["perm"])) for entry in io["inputs"]]
