"""Keras model → ``.tflite`` bytes with TensorFlow's converter, plus edgec's metadata.

Only TFLite builtin ops are allowed (no Flex/Select TF ops): an artifact that needs the
TensorFlow runtime on the device is not an edge artifact. The converter runs offline; it
fetches nothing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import convert as tf_convert
from tensorflow.lite.python import conversion_metadata_schema_py_generated as conversion_metadata_fb
import tf_keras as keras
from ai_edge_litert import schema_py_generated as tfl_schema

from edgec.errors import UnsupportedOpError
from edgec.lower.tflite.context import ORT_HINT
from edgec.lower.tflite.flatbuffer import packed
from edgec.quiet import captured_stderr


def keras_to_tflite(
    model: keras.Model,
    target: str,
    precision: str = "fp32",
    representative: Sequence[list[np.ndarray]] = (),
) -> bytes:
    """Convert with TFLite's converter: fp32; fp16 weights; or, for int8, the *calibrated*
    float model (activation ranges recorded from ``representative``, one list of
    Keras-ordered, Keras-layout input arrays per sample) that ``quantize_calibrated`` turns
    into int8 as often as needed without calibrating again."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    converter = _converted(lambda: _converter(model), model.name, target)  # tracing can fail like converting
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        # In the traced function's input order, which is the Keras model's (no signature yet).
        converter.representative_dataset = lambda: (list(sample) for sample in representative)
        converter._experimental_calibrate_only = True  # the converter's own split between the two steps
    return _signed(_converted(converter.convert, model.name, target), model.input_names, model.output_names)


def _converter(model: keras.Model) -> tf.lite.TFLiteConverter:
    """TFLite's converter on the Keras model's inference function, traced once.

    ``from_keras_model`` first saves the model as a Keras SavedModel, which traces every
    layer's call functions for serialization: 90% of a 3-GMAC detector's conversion time.
    From a concrete function the converter by default still writes and re-reads a SavedModel
    of it (0.7 of the digits MobileNetV2's 1.2 s conversion); converting the frozen
    function instead gives the same operators, constants and activation tensors, without the
    signature the SavedModel gave (``_signed`` adds it).
    """
    specs = [tf.TensorSpec(i.shape, i.dtype, name=name) for i, name in zip(model.inputs, model.input_names)]

    @tf.function(input_signature=specs)
    def serve(*inputs):
        outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
        return outputs if isinstance(outputs, list) else [outputs]  # in ``model.output_names`` order

    variables = tf.Module()
    variables.weights = list(model.weights)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()], variables)
    converter.experimental_lower_to_saved_model = False
    # What the file's conversion metadata records as the source: it is still a Keras model.
    converter._metadata.environment.modelType = conversion_metadata_fb.ModelType.KERAS_MODEL
    return converter


def _signed(content: bytes, input_names: Sequence[str], output_names: Sequence[str]) -> bytes:
    """``content`` with the signature a SavedModel conversion writes: ``serving_default``,
    inputs and outputs keyed by the Keras model's names. Runners, the calibrator and the
    quantizer's op mapping find the model's I/O by these keys. The output tensors, which the
    frozen function names ``Identity``, ``Identity_1``..., are named by their keys too."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    graph = model.subgraphs[0]
    for name, index in zip(output_names, graph.outputs, strict=True):
        graph.tensors[index].name = name
    signature = tfl_schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = "serving_default", 0
    signature.inputs = [_tensor_map(name, index) for name, index in zip(input_names, graph.inputs, strict=True)]
    signature.outputs = [_tensor_map(name, index) for name, index in zip(output_names, graph.outputs, strict=True)]
    model.signatureDefs = [signature]
    return packed(model, len(content))


def _tensor_map(name: str, index: int) -> tfl_schema.TensorMapT:
    entry = tfl_schema.TensorMapT()
    entry.name, entry.tensorIndex = name, int(index)
    return entry


def quantize_calibrated(
    calibrated: bytes, target: str, int8_io: bool = False, float_ops: Sequence[str] = (), float_nodes: Sequence[str] = ()
) -> bytes:
    """Full-integer int8 from a calibrated model, as the converter does it after calibrating.

    Per-channel int8 weights, per-tensor int8 activations. Ops without an int8 kernel, the
    op types in ``float_ops`` and the ops named in ``float_nodes`` (``op_names``) stay float
    between (de)quantize ops; I/O stays float unless ``int8_io``.
    """
    io_type = tf.int8 if int8_io else tf.float32
    return _converted(
        lambda: tf_convert.mlir_quantize(
            calibrated, input_data_type=io_type, output_data_type=io_type, denylisted_ops=list(float_ops),
            denylisted_nodes=list(float_nodes),
        ),
        "calibrated model", target,
    )


def op_names(content: bytes) -> list[str]:
    """The names the quantizer knows the ops of a .tflite by: their first output tensor's
    name, which the converter builds from the Keras layers fused into the op
    (``<model>/<layer>/<tf op>;...``)."""
    graph = tfl_schema.Model.GetRootAs(content, 0).Subgraphs(0)
    return [graph.Tensors(graph.Operators(i).Outputs(0)).Name().decode() for i in range(graph.OperatorsLength())]


def op_nodes(names: list[str], layers: dict[str, list[str]]) -> list[list[str]]:
    """For each op name (``op_names``), the source nodes (``KerasLowering.layers``: node →
    its Keras layers) whose layers it carries, sorted."""
    marks = {node: [f"/{layer}/" for layer in node_layers] for node, node_layers in layers.items()}
    return [sorted(node for node, node_marks in marks.items() if any(mark in name for mark in node_marks)) for name in names]


def output_ops(content: bytes) -> dict[int, str]:
    """Op index → signature output key, for the ops of the main subgraph that produce an
    output, and for the op whose int8 result the DEQUANTIZE producing a float output reads
    (the converter names both after the signature, not after their layers)."""
    model = tfl_schema.Model.GetRootAs(content, 0)
    graph, signature = model.Subgraphs(0), model.SignatureDefs(0)
    keys = {signature.Outputs(i).TensorIndex(): signature.Outputs(i).Name().decode() for i in range(signature.OutputsLength())}
    producer = {graph.Operators(i).Outputs(0): i for i in range(graph.OperatorsLength())}
    builtins = [op for op, _ in _operators(content)]
    found = {}
    for tensor, key in keys.items():
        op = producer.get(tensor)
        while op is not None:
            found[op] = key
            dequantize = graph.Operators(op).InputsLength() == 1 and builtins[op] == "DEQUANTIZE"
            op = producer.get(graph.Operators(op).Inputs(0)) if dequantize else None
    return found


def _converted(convert, name: str, target: str) -> bytes:
    try:
        with captured_stderr(), warnings.catch_warnings():  # the converter logs every MLIR pass to fd 2
            # Emitted by the converter's own intermediate float pass during int8 calibration.
            warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
            # The calibrator reads the signature of calibration samples given by name with it.
            warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated")
            return convert()
    except Exception as exc:  # ConverterError and friends carry MLIR diagnostics
        raise UnsupportedOpError(
            "?", name, target=target,
            reason=f"the TFLite converter rejected the lowered model: {_diagnostic(exc)}",
            hint=ORT_HINT,
        ) from exc


def _diagnostic(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "error:" in line]
    return lines[0] if lines else str(exc).strip().splitlines()[0]


def add_metadata(content: bytes, entries: Mapping[str, bytes]) -> bytes:
    """Append named metadata entries (a standard TFLite flatbuffer field) to a model, in
    one unpack and repack (each took 0.2 s on a 7 MB model)."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    for name, data in entries.items():
        buffer = tfl_schema.BufferT()
        buffer.data = np.frombuffer(data, dtype=np.uint8)
        model.buffers.append(buffer)
        entry = tfl_schema.MetadataT()
        entry.name = name
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*(model.metadata or []), entry]
    return packed(model, len(content) + sum(map(len, entries.values())))


_BUILTIN_NAMES = {v: k for k, v in vars(tfl_schema.BuiltinOperator).items() if not k.startswith("_")}


def op_histogram(content: bytes) -> dict[str, int]:
    """Count the operators of a .tflite's main subgraph by builtin name."""
    return _count(op for op, _ in _operators(content))


def float_op_histogram(content: bytes) -> dict[str, int]:
    """Count the operators that compute in float (their first output is float32 or float16).

    After full-integer quantization only the I/O (DE)QUANTIZE ops and ops the runtime has
    no int8 kernel for are left here.
    """
    return _count(op for op, output_type in _operators(content) if output_type in _FLOATS and op != "DEQUANTIZE")


_FLOATS = (tfl_schema.TensorType.FLOAT32, tfl_schema.TensorType.FLOAT16)


def integer_ops(content: bytes, builtins: Collection[str]) -> list[bool]:
    """For each op of the main subgraph, whether it is one of ``builtins`` computing in integer
    (its first output is not float)."""
    return [op in builtins and output_type not in _FLOATS for op, output_type in _operators(content)]


def _operators(content: bytes) -> list[tuple[str, int]]:
    """(builtin name, first output's tensor type) for each op of the main subgraph."""
    model = tfl_schema.Model.GetRootAs(content, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        codes.append(_BUILTIN_NAMES.get(builtin, f"CUSTOM:{code.CustomCode()}"))
    graph = model.Subgraphs(0)
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        ops.append((codes[op.OpcodeIndex()], graph.Tensors(op.Outputs(0)).Type()))
    return ops


def _count(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
