"""Which TFLite operator (and so which source layer) each row of LiteRT's op profile times.

With XNNPACK, LiteRT's profiler reports XNNPACK's own operators ("Convolution (NHWC, F32)
IGEMM #12"), in execution order, with no link back to the model. XNNPACK's delegate turns the
TFLite operators into its operators in the same order, but not one for one: some vanish
(fp16 weights' DEQUANTIZE, an activation fused into the op before it, a reshape it elides),
some become several (a fused activation XNNPACK cannot fold becomes a "Clamp" after the op, a
CONCATENATION one "Copy" per input). ``name_rows`` aligns the two sequences under those rules
and names a row only where every alignment the rules allow agrees on its operator; other rows
stay unnamed rather than guessed.
"""

from __future__ import annotations

import dataclasses
import json

from ai_edge_litert import schema_py_generated as tfl_schema

from edgec.runtime.litert import OP_NODES_METADATA, read_metadata

# TFLite builtin → the XNNPACK operator names (prefixes) its main row may have.
ROW_KINDS: dict[str, tuple[str, ...]] = {
    "CONV_2D": ("Convolution", "Fully Connected"), "DEPTHWISE_CONV_2D": ("Convolution",),
    "TRANSPOSE_CONV": ("Deconvolution",), "FULLY_CONNECTED": ("Fully Connected",), "BATCH_MATMUL": ("Batch Matrix Multiply",),
    "ADD": ("Add",), "SUB": ("Subtract",), "MUL": ("Multiply",), "DIV": ("Divide",), "MAXIMUM": ("Maximum",),
    "MINIMUM": ("Minimum",), "SQUARED_DIFFERENCE": ("Squared Difference",), "PRELU": ("PReLU",),
    "MAX_POOL_2D": ("Max Pooling",), "AVERAGE_POOL_2D": ("Average Pooling",), "MEAN": ("Mean", "Global Average Pooling"),
    "SUM": ("Sum",), "PAD": ("Constant Pad",), "PADV2": ("Constant Pad",),
    "RESHAPE": ("Static Reshape", "Copy"), "SQUEEZE": ("Static Reshape", "Copy"), "EXPAND_DIMS": ("Static Expand Dims", "Static Reshape", "Copy"),
    "CONCATENATION": ("Copy", "Concatenate"), "SPLIT": ("Copy", "Split"), "SPLIT_V": ("Copy", "Split"),
    "PACK": ("Copy", "Concatenate"), "UNPACK": ("Copy", "Split"),
    "SLICE": ("Slice", "Static Slice"), "STRIDED_SLICE": ("Slice", "Static Slice"), "TRANSPOSE": ("Transpose",),
    "RESIZE_BILINEAR": ("Resize Bilinear",), "RESIZE_NEAREST_NEIGHBOR": ("Resize",), "DEPTH_TO_SPACE": ("Depth To Space",),
    "SPACE_TO_DEPTH": ("Space To Depth",), "HARD_SWISH": ("HardSwish",), "LOGISTIC": ("Sigmoid",), "TANH": ("Tanh",),
    "RELU": ("Clamp",), "RELU6": ("Clamp",), "RELU_N1_TO_1": ("Clamp",), "RELU_0_TO_1": ("Clamp",),
    "LEAKY_RELU": ("Leaky ReLU",), "ELU": ("ELU",), "GELU": ("GELU",), "SOFTMAX": ("Softmax",),
    "RSQRT": ("Reciprocal Square Root",), "SQRT": ("Square Root",), "SQUARE": ("Square",), "ABS": ("Abs",),
    "NEG": ("Negate",), "FLOOR": ("Floor",), "CEIL": ("Ceiling",), "ROUND": ("Bankers Rounding",),
    "QUANTIZE": ("Convert",), "DEQUANTIZE": ("Convert",),
    "CUSTOM:Convolution2DTransposeBias": ("Deconvolution",), "CUSTOM:MaxPoolingWithArgmax2D": ("Argmax Pooling",),
    "CUSTOM:MaxUnpooling2D": ("Unpooling",),
}
# Operators XNNPACK may run as no row of their own: static weight conversion, activations
# fused into the op before, a zero pad fused into the conv after, reshapes and transposes
# it folds into a neighbour.
MAY_VANISH = {"DEQUANTIZE", "PAD", "PADV2", "RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE"}
# Rows that may follow an operator's main row: an activation XNNPACK could not fuse, a
# reshape it adds (e.g. a MEAN without keep_dims).
TRAILING = ("Clamp", "Static Reshape", "Copy")
# Rows that may come before it: the reshape XNNPACK puts before a fully connected op that
# flattens its input.
LEADING = ("Static Reshape", "Copy")
REPEATED = {"CONCATENATION", "SPLIT", "SPLIT_V", "PACK", "UNPACK"}  # one row per input or output


@dataclasses.dataclass(frozen=True)
class RowName:
    """The operator a row belongs to (index into the TFLite operators), or the candidates
    when the alignment is ambiguous, or none when no alignment explains the rows."""

    operator: int | None
    candidates: tuple[int, ...] = ()


def name_rows(operators: list[str], rows: list[str]) -> list[RowName]:
    """Align ``rows`` (profile tags in execution order, XNNPACK's names or, for ops left
    outside the delegate, their TFLite builtin names) with ``operators`` (the TFLite builtin
    names in execution order)."""
    n, m = len(operators), len(rows)
    reach = [[False] * (m + 1) for _ in range(n + 1)]  # operators[:i] explain rows[:j]
    reach[0][0] = True
    spans = [[list(_spans(op, rows, j)) for j in range(m + 1)] for op in operators]
    for i in range(n):
        for j in range(m + 1):
            if reach[i][j]:
                for k in spans[i][j]:
                    reach[i + 1][j + k] = True
    if not reach[n][m]:
        return [RowName(None)] * m
    back = [[False] * (m + 1) for _ in range(n + 1)]  # operators[i:] explain rows[j:]
    back[n][m] = True
    for i in range(n - 1, -1, -1):
        for j in range(m + 1):
            back[i][j] = any(back[i + 1][j + k] for k in spans[i][j])
    owners: list[set[int]] = [set() for _ in range(m)]
    for i in range(n):
        for j in range(m + 1):
            if reach[i][j]:
                for k in spans[i][j]:
                    if back[i + 1][j + k]:
                        for row in range(j, j + k):
                            owners[row].add(i)
    return [RowName(next(iter(o))) if len(o) == 1 else RowName(None, tuple(sorted(o))) for o in owners]


def _spans(op: str, rows: list[str], start: int):
    """How many rows from ``start`` on the operator ``op`` can account for (possibly one
    length more than once)."""
    if op in MAY_VANISH:
        yield 0
    if start < len(rows) and rows[start] == op:  # left outside XNNPACK: one row under its TFLite name
        yield 1
        return
    kinds = ROW_KINDS.get(op, ())
    main = start
    while main < len(rows):
        if rows[main].startswith(kinds):
            end = main + 1
            yield end - start
            while end < len(rows) and (rows[end].startswith(TRAILING) or (op in REPEATED and rows[end].startswith(kinds))):
                end += 1
                yield end - start
        if not rows[main].startswith(LEADING):
            return
        main += 1


_BUILTIN_NAMES = {v: k for k, v in vars(tfl_schema.BuiltinOperator).items() if not k.startswith("_")}


def operator_kinds(content: bytes) -> list[str]:
    """The builtin name of each operator of the main subgraph, in execution order
    (``CUSTOM:<code>`` for custom ops)."""
    model = tfl_schema.Model.GetRootAs(content, 0)
    kinds = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        kinds.append(f"CUSTOM:{code.CustomCode().decode()}" if builtin == tfl_schema.BuiltinOperator.CUSTOM else _BUILTIN_NAMES[builtin])
    graph = model.Subgraphs(0)
    return [kinds[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength())]


def operator_names(content: bytes) -> list[str]:
    """A name per operator of the main subgraph: the source nodes it came from where edgec
    recorded them (``OP_NODES_METADATA``), else the name of its first output tensor."""
    graph = tfl_schema.Model.GetRootAs(content, 0).Subgraphs(0)
    tensor_names = [graph.Tensors(graph.Operators(i).Outputs(0)).Name().decode() for i in range(graph.OperatorsLength())]
    nodes = json.loads(read_metadata(content, OP_NODES_METADATA) or b"null") or [[] for _ in tensor_names]
    return [", ".join(source) or name for source, name in zip(nodes, tensor_names)]


class RowLabels:
    """Names for the rows of a profiled run of one ``.tflite`` (aligned once per row sequence)."""

    def __init__(self, content: bytes):
        self.kinds, self.names = operator_kinds(content), operator_names(content)
        self._aligned: dict[tuple[str, ...], list[str]] = {}

    def of(self, rows: list[str]) -> list[str]:
        key = tuple(rows)
        if key not in self._aligned:
            self._aligned[key] = [self.names[r.operator] if r.operator is not None else f"{tag} #{position} (unmapped)"
                                  for position, (tag, r) in enumerate(zip(rows, name_rows(self.kinds, rows)))]
        return self._aligned[key]
