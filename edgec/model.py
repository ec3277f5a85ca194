"""Loading, checking and saving ONNX models.

edgec's one in-memory representation is ``onnx_ir.Model``: every pass reads and edits it
through def-use links. This module is the border where protobuf files become IR and back,
and where files that are missing, truncated, hostile or not ONNX at all are turned away
with a message that says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from edgec.errors import ModelCheckError, ModelLoadError

# Files above this are refused rather than parsed: protobuf cannot hold more than 2 GiB,
# and a larger file is either external-data based (handled separately) or hostile.
MAX_PROTO_BYTES = 2**31 - 1
# The oldest default-domain opset edgec upgrades from; below it the version converter is
# unreliable and a re-export is the better fix.
MIN_OPSET = 7
# Opsets before 13 put Split/Squeeze/Unsqueeze axes and Softmax semantics in forms the
# passes would each have to special-case; upgrading once keeps the rules single-form.
CANONICAL_MIN_OPSET = 13
# Newer onnx releases stamp IR versions that deployed runtimes refuse (onnx 1.19 writes 12,
# ONNX Runtime 1.23 reads up to 11); nothing edgec emits needs more than 10.
MAX_IR_VERSION = 10


def load(path: str | os.PathLike[str]) -> ir.Model:
    """Read, validate and convert an ONNX file to IR, upgrading old opsets to 13."""
    proto = load_proto(path)
    return ir.serde.deserialize_model(proto)


def load_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read and validate an ONNX file (with external data), returning the checked proto."""
    path = Path(path)
    _check_readable(path)
    proto = _parse(path)
    _load_external_data(proto, path)
    _check_is_model(proto, path)
    _check(proto, path)
    proto = _upgrade_opset(proto, path)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize deterministically, so equal models give byte-identical files."""
    return to_proto(model).SerializeToString(deterministic=True)


def check(model: ir.Model, what: str = "the model") -> None:
    """Run the ONNX checker on an IR model; used after passes to prove they kept it valid."""
    try:
        onnx.checker.check_model(to_proto(model))
    except onnx.checker.ValidationError as exc:
        raise ModelCheckError(f"ONNX checker rejected {what}: {_first_line(exc)}") from exc


def default_opset(model: ir.Model | onnx.ModelProto) -> int:
    imports = model.opset_imports if isinstance(model, ir.Model) else {
        o.domain: o.version for o in model.opset_import
    }
    return int(imports.get("", imports.get("ai.onnx", 0)))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"No such file: '{path}'.", hint="Check the path to the .onnx model.")
    if path.is_dir():
        raise ModelLoadError(f"'{path}' is a directory, not an ONNX file.", hint="Pass the .onnx file itself.")
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"'{path}' is empty.", hint="Re-export the model; the file was not written.")
    if size > MAX_PROTO_BYTES:
        raise ModelLoadError(
            f"'{path}' is {size / 2**30:.1f} GiB, beyond protobuf's 2 GiB limit.",
            hint="Save large models with external data (onnx.save(..., save_as_external_data=True)).",
        )
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"'{path}' is not readable.", hint="Check the file's permissions.")


def _parse(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)}).",
            hint="The file may be truncated or in another format; re-export it to ONNX.",
        ) from exc


def _check_is_model(proto: onnx.ModelProto, path: Path) -> None:
    """Reject byte strings that happen to parse as protobuf but carry no ONNX model."""
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.node:
        raise ModelLoadError(
            f"'{path}' parses as protobuf but holds no ONNX graph (ir_version={proto.ir_version}, "
            f"{len(proto.graph.node)} nodes).",
            hint="Check that this is the exported .onnx file and not another artifact.",
        )


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Load external tensors, refusing locations outside the model's folder or files too short."""
    base = path.parent
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        _check_external_location(base, info, tensor.name, path)
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
    except (onnx.checker.ValidationError, OSError) as exc:
        raise ModelLoadError(
            f"External data of '{path}' cannot be loaded: {_first_line(exc)}.",
            hint="Keep the data files next to the model, with the names the model records.",
        ) from exc


def _check_external_location(base: Path, info, tensor_name: str, path: Path) -> None:
    location = Path(info.location)
    resolved = (base / location).resolve()
    if location.is_absolute() or ".." in location.parts or not resolved.is_relative_to(base.resolve()):
        raise ModelLoadError(
            f"Tensor '{tensor_name}' in '{path}' points at external data outside the model's folder "
            f"('{info.location}'); edgec refuses to read it.",
            hint="Re-save the model with its external data beside it.",
        )
    if not resolved.is_file():
        raise ModelLoadError(
            f"External data file '{info.location}' for tensor '{tensor_name}' is missing.",
            hint=f"Copy it next to '{path.name}'.",
        )
    end = (info.offset or 0) + (info.length or 0)
    if end > resolved.stat().st_size:
        raise ModelLoadError(
            f"External data for tensor '{tensor_name}' ends at byte {end}, past the end of "
            f"'{info.location}' ({resolved.stat().st_size} bytes): the file is truncated.",
            hint="Re-export the model.",
        )


def _check(proto: onnx.ModelProto, path: Path) -> None:
    domains = sorted(o.domain for o in proto.opset_import if o.domain not in ("", "ai.onnx"))
    if default_opset(proto) == 0 and domains:
        raise ModelCheckError(
            f"'{path}' imports no standard ONNX opset, only {', '.join(domains)}: edgec compiles graphs of standard "
            "ONNX ops (for example ai.onnx.ml's classical models and ai.onnx.preview.training's optimizers are not).",
            hint="Export the network itself as standard ONNX ops.",
        )
    if default_opset(proto) < MIN_OPSET:
        raise ModelCheckError(
            f"'{path}' uses ONNX opset {default_opset(proto)}, older than edgec supports ({MIN_OPSET}).",
            hint=f"Re-export the model with opset {CANONICAL_MIN_OPSET} or newer.",
        )
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelCheckError(f"ONNX checker rejected '{path}': {_first_line(exc)}", hint=_check_hint(proto)) from exc


# TensorFlow function calls a converter left in the graph instead of inlining them.
TF_FUNCTION_CALLS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def _check_hint(proto: onnx.ModelProto) -> str:
    call = next((n for n in proto.graph.node if n.op_type in TF_FUNCTION_CALLS), None)
    if call is None:
        return "The exporter produced an invalid graph; re-export it or fix the named node."
    return (f"Node '{call.name}' is a TensorFlow function call ({call.op_type}) the converter did not "
            "inline: tf2onnx leaves functions compiled with XLA as calls, and tf_keras compiles every "
            "Conv2D with groups > 1 (ConvNeXt's and RegNet's) that way. Re-export with those layers "
            "rebuilt without XLA (a DepthwiseConv2D for groups == channels, per-group Conv2Ds otherwise).")


def _upgrade_opset(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    if default_opset(proto) >= CANONICAL_MIN_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, CANONICAL_MIN_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise ModelCheckError(
            f"Could not upgrade '{path}' from opset {default_opset(proto)} to {CANONICAL_MIN_OPSET}: "
            f"{_first_line(exc)}",
            hint=f"Re-export the model with opset {CANONICAL_MIN_OPSET} or newer.",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
