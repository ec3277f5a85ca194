"""A PReLU of one slope as an int8 LEAKY_RELU, written into the calibrated model.

The XNNPACK delegate of the pinned LiteRT has no int8 PRELU, so an int8 build keeps PRELU
float (DEQUANTIZE → fp32 PRELU → QUANTIZE, inside the one XNNPACK partition). A PReLU whose
slope is one number (PyTorch's ``nn.PReLU()`` default) is exactly a LEAKY_RELU, which XNNPACK
runs in int8: on the emulated Cortex-A76 that costs 0.07 M instructions on a 64×64×16 tensor
where the float PRELU costs 0.38 M. Its input and output tensors, and so their calibrated
ranges, stay as they were.

Per-channel slopes stay float: every int8 form measured costs more than the float PRELU
(``((1+a)/2)·x + ((1−a)/2)·|x|`` as LEAKY_RELU, 2 MUL, ADD made hand_recrop's int8 file
15.96 M instructions instead of 11.84 M; XNNPACK's int8 MUL by a per-channel constant costs
about 4 instructions per element; see README, int8).
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as tfl_schema

from edgec.lower.tflite.flatbuffer import builtin_codes, packed

_OP = tfl_schema.BuiltinOperator


def shared_slope_prelu_as_leaky_relu(calibrated: bytes) -> tuple[bytes, int]:
    """The calibrated model with every PRELU whose slope is one constant number replaced by a
    LEAKY_RELU of that slope, and how many were replaced."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(calibrated), 0)
    prelu = _find_opcode(model, _OP.PRELU)
    replaced = 0
    for op in model.subgraphs[0].operators:
        slope = _shared_slope(model, op) if op.opcodeIndex == prelu else None
        if slope is not None:
            options = tfl_schema.LeakyReluOptionsT()
            options.alpha = slope
            op.opcodeIndex, op.inputs = _opcode(model, _OP.LEAKY_RELU), op.inputs[:1]
            op.builtinOptionsType, op.builtinOptions = tfl_schema.BuiltinOptions.LeakyReluOptions, options
            replaced += 1
    if not replaced:
        return calibrated, 0
    return packed(model, len(calibrated)), replaced


def _shared_slope(model, op) -> float | None:
    """The PRELU's slope if it is a constant with one value throughout, else None."""
    tensor = model.subgraphs[0].tensors[op.inputs[1]]
    data = model.buffers[tensor.buffer].data
    if data is None or tensor.type != tfl_schema.TensorType.FLOAT32:
        return None
    slope = np.frombuffer(bytes(data), np.float32)
    return float(slope[0]) if slope.size and np.all(slope == slope[0]) else None


def _find_opcode(model, builtin: int) -> int | None:
    codes = builtin_codes(model)
    return codes.index(builtin) if builtin in codes else None


def _opcode(model, builtin: int) -> int:
    """The index of ``builtin``'s operator code, added when the model has none."""
    found = _find_opcode(model, builtin)
    if found is not None:
        return found
    code = tfl_schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1
