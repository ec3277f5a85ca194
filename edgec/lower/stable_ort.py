"""Make ONNX Runtime's ``.ort`` files byte-for-byte reproducible.

ONNX Runtime writes the kernel type-string resolver of an ``.ort`` file (which kernel type
constraint binds which input/output of each op) from a hash map keyed by pointers, so with
address-space randomization the same model gives files of the same size and content whose
bytes are laid out differently on each run (measured: the resolver region of a MobileNetV3
``.ort`` differed in 618 bytes between three processes and was identical with ASLR off).
edgec promises byte-identical artifacts, so the file's head — the root table and the
resolver, which ORT writes after the model — is rebuilt here in one fixed layout, and the
model's bytes are kept exactly as ORT wrote them.

Layout facts this relies on (ORT format, ``fbs::InferenceSession``): the root table's fields
are ``ort_version`` (slot 0), ``model`` (1), a deprecated session state (2, never written by
ORT ≥ 1.13) and ``kernel_type_str_resolver`` (3); ORT writes the version string, then the
model, then the resolver, so the version string and the model fill the end of the buffer.
"""

from __future__ import annotations

import flatbuffers
from flatbuffers import number_types as types
from flatbuffers.table import Table

from edgec.errors import InternalError

IDENTIFIER = b"ORTM"
VERSION, MODEL, SESSION_STATE, RESOLVER = range(4)  # InferenceSession's fields


def stable_ort(data: bytes) -> bytes:
    """The same ``.ort`` model with its head rebuilt deterministically."""
    buf = bytearray(data)
    root = Table(buf, flatbuffers.encode.Get(types.UOffsetTFlags.packer_type, buf, 0))
    if _slot(root, SESSION_STATE):
        raise InternalError("This .ort file has a (deprecated) session state edgec cannot rewrite.")
    version, model = _position(root, VERSION), _position(root, MODEL)
    resolver = _read_resolver(Table(buf, _position(root, RESOLVER)))
    tail_start = min(model, model - flatbuffers.encode.Get(types.SOffsetTFlags.packer_type, buf, model))
    return _rebuild(bytes(buf[tail_start:]), len(buf) - model, len(buf) - version, resolver)


def _rebuild(tail: bytes, model: int, version: int, resolver: list) -> bytes:
    """``tail`` (the model and version string, offsets ``model``/``version`` from the end)
    at the end of a new buffer, then the resolver and the root table in front of it."""
    builder = flatbuffers.Builder(len(tail) + 4096)
    builder.minalign = 16  # the tail keeps its alignment relative to the buffer's end
    builder.Prep(1, len(tail))
    builder.head -= len(tail)
    builder.Bytes[builder.head:builder.head + len(tail)] = tail
    resolver_offset = _write_resolver(builder, resolver)
    builder.StartObject(4)
    builder.PrependUOffsetTRelativeSlot(VERSION, version, 0)
    builder.PrependUOffsetTRelativeSlot(MODEL, model, 0)
    builder.PrependUOffsetTRelativeSlot(RESOLVER, resolver_offset, 0)
    builder.Finish(builder.EndObject(), file_identifier=IDENTIFIER)
    return bytes(builder.Output())


def _read_resolver(table: Table) -> list:
    """[(op id, [(kernel type string, [(arg type, index), ...]), ...]), ...] in file order."""
    return [
        (_string(op, 0), [
            (_string(entry, 0), [(_scalar(arg, 0, types.Int8Flags), _scalar(arg, 1, types.Uint32Flags)) for arg in _tables(entry, 1)])
            for entry in _tables(op, 1)
        ])
        for op in _tables(table, 0)
    ]


def _write_resolver(builder: flatbuffers.Builder, resolver: list) -> int:
    ops = []
    for op_id, entries in resolver:
        written = []
        for type_string, args in entries:
            arg_tables = [_arg(builder, arg_type, index) for arg_type, index in args]
            arg_vector, name = _vector(builder, arg_tables), builder.CreateString(type_string)
            written.append(_pair(builder, name, arg_vector))
        entry_vector, name = _vector(builder, written), builder.CreateString(op_id)
        ops.append(_pair(builder, name, entry_vector))
    ops_vector = _vector(builder, ops)
    builder.StartObject(1)
    builder.PrependUOffsetTRelativeSlot(0, ops_vector, 0)
    return builder.EndObject()


def _arg(builder: flatbuffers.Builder, arg_type: int, index: int) -> int:
    builder.StartObject(2)
    builder.PrependInt8Slot(0, arg_type, 0)
    builder.PrependUint32Slot(1, index, 0)
    return builder.EndObject()


def _pair(builder: flatbuffers.Builder, name: int, vector: int) -> int:
    """A table of (string, vector): the shape of both resolver entry types."""
    builder.StartObject(2)
    builder.PrependUOffsetTRelativeSlot(0, name, 0)
    builder.PrependUOffsetTRelativeSlot(1, vector, 0)
    return builder.EndObject()


def _vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _slot(table: Table, slot: int) -> int:
    return table.Offset(4 + 2 * slot)


def _position(table: Table, slot: int) -> int:
    return table.Indirect(table.Pos + _slot(table, slot))


def _string(table: Table, slot: int) -> str:
    return table.String(table.Pos + _slot(table, slot)).decode()


def _scalar(table: Table, slot: int, flags) -> int:
    offset = _slot(table, slot)
    return table.Get(flags, table.Pos + offset) if offset else 0


def _tables(table: Table, slot: int) -> list[Table]:
    offset = _slot(table, slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(offset))]
