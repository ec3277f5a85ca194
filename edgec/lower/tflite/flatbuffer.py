"""Reading and writing a ``.tflite``'s flatbuffer object API (``ModelT``), which the
lowering's rewrites share: packing it back into bytes, and its operators' builtin codes."""

from __future__ import annotations

import flatbuffers
from ai_edge_litert import schema_py_generated as tfl_schema

FILE_IDENTIFIER = b"TFL3"


def packed(model: tfl_schema.ModelT, size_hint: int) -> bytes:
    """``model`` as ``.tflite`` bytes (``size_hint``: about the size it will have)."""
    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def builtin_codes(model: tfl_schema.ModelT) -> list[int]:
    """Each operator code's builtin operator (newer ones live in ``builtinCode`` only)."""
    return [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
