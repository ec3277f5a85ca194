"""Channels-last layout assignment: an ONNX → ONNX pass for backends whose kernels are NHWC.

ONNX convolutions are channels-first (NCHW); TFLite/XNNPACK kernels are channels-last (NHWC).
The pass decides, per tensor, which layout it lives in, in three steps that are correct by
construction and then minimal:

1. **Wrap.** Every layout-sensitive op (Conv, pools, Resize, ...) becomes the same op in the
   ``edgec.channels_last`` domain, whose data input and output are channels-last, between
   ``Transpose(to channels-last)`` and ``Transpose(back)``. Weights keep their ONNX layout.
   The graph computes exactly what it did.
2. **Move transposes** until nothing improves: fold them into constants, merge adjacent
   ones (inverse pairs vanish), push them down through ops that have a layout rule
   (elementwise with broadcasting, Concat/Split/Softmax/Reduce*/Pad/Slice/Squeeze/
   Unsqueeze/Gather: the op's axes and constants are rewritten instead), hoist them up
   through such ops when that reaches a graph input or another transpose, and fold a
   transpose before Flatten→Gemm/MatMul into the weight's rows. An op without a rule keeps
   its transposes: slower, never wrong.
3. **Absorb at the boundary.** A graph input read only through one transpose, or an
   output written by one, changes layout instead; the permutation is kept in the value's
   ``meta[LAYOUT_PERM]`` (``stored = source.transpose(perm)``) so runners can translate.

Example: ``x[1,3,32,32] → Conv → Relu → Conv → y`` becomes
``x[1,32,32,3] → cl::Conv → Relu → cl::Conv → y`` with no Transpose, and input perm (0,2,3,1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.crash import at
from edgec.graph import (
    add_initializer,
    attr,
    constant,
    input_or_attr,
    is_constant,
    normalize_axes,
    sole_consumer,
    static_shape,
    take_name,
)
from edgec.passes.fuse import FUSED_DOMAIN
from edgec.passes.pipeline import PassOutcome

CL_DOMAIN = "edgec.channels_last"
LAYOUT_PERM = "edgec.layout_perm"
Perm = tuple[int, ...]
MAX_ROUNDS = 64


# --- permutation algebra -------------------------------------------------------------------

def to_channels_last(rank: int) -> Perm:
    return (0, *range(2, rank), 1)


def to_channels_first(rank: int) -> Perm:
    return (0, rank - 1, *range(1, rank - 1))


def inverse(perm: Sequence[int]) -> Perm:
    return tuple(int(i) for i in np.argsort(perm))


def compose(first: Sequence[int], second: Sequence[int]) -> Perm:
    """The single transpose equal to transposing by ``first`` and then by ``second``."""
    return tuple(first[i] for i in second)


def is_identity(perm: Sequence[int]) -> bool:
    return tuple(perm) == tuple(range(len(perm)))


def permute_shape(shape: ir.Shape | None, perm: Sequence[int]) -> ir.Shape | None:
    return None if shape is None else ir.Shape([shape[i] for i in perm])


# --- which ops are channels-last, and when -------------------------------------------------

def _rank_in(*ranks: int) -> Callable[[ir.Node], bool]:
    return lambda node: node.inputs[0].shape is not None and node.inputs[0].shape.rank() in ranks


def _single_output_pool(node: ir.Node) -> bool:
    # MaxPool's optional Indices output is in NCHW flat-index terms; leave such nodes alone.
    return _rank_in(3, 4)(node) and len([o for o in node.outputs if o.uses() or o.is_graph_output()]) == 1


def _spatial_resize(node: ir.Node) -> bool:
    """Resize only maps to NHWC kernels when it scales spatial dims of a 4-D tensor."""
    x, y = node.inputs[0], node.outputs[0]
    if x.shape is None or y.shape is None or x.shape.rank() != 4:
        return False
    return x.shape[0] == y.shape[0] and x.shape[1] == y.shape[1]


# ONNX op → predicate: may it run channels-last? (The lowering needs a rule for each.)
CHANNELS_LAST_OPS: dict[str, Callable[[ir.Node], bool]] = {
    "Conv": _rank_in(3, 4),
    "ConvTranspose": _rank_in(3, 4),
    "MaxPool": _single_output_pool,
    "AveragePool": _rank_in(3, 4),
    "GlobalAveragePool": _rank_in(3, 4),
    "GlobalMaxPool": _rank_in(3, 4),
    "Resize": _spatial_resize,
    "DepthToSpace": _rank_in(4),
    "SpaceToDepth": _rank_in(4),
    "LRN": _rank_in(4),
}
# Ops of edgec's fused domain that run channels-last too (the lowering needs a rule for each).
FUSED_CHANNELS_LAST_OPS: dict[str, Callable[[ir.Node], bool]] = {"GroupNorm": _rank_in(3, 4)}
_CHANNELS_LAST_BY_DOMAIN = {"": CHANNELS_LAST_OPS, "ai.onnx": CHANNELS_LAST_OPS, FUSED_DOMAIN: FUSED_CHANNELS_LAST_OPS}


def _runs_channels_last(node: ir.Node) -> bool:
    return _CHANNELS_LAST_BY_DOMAIN.get(node.domain, {}).get(node.op_type, lambda _: False)(node)


# --- layout rules: how an op consumes transposed inputs --------------------------------------

@dataclasses.dataclass
class Rewrite:
    """Edits that let an op read its inputs un-transposed; ``out_perms[k]`` restores output k."""

    out_perms: list[Perm]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    const_inputs: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PushRule:
    """For op ``z = op(y)`` with ``y = transpose(a, p)``: how to compute ``op'(a)`` instead.

    ``layout_inputs(node)`` lists the inputs carrying the transposed tensor; ``broadcast``
    says lower-rank constants among them broadcast elementwise; ``rewrite(node, p)`` returns
    the edits, or None when this configuration has no layout-free form.
    """

    layout_inputs: Callable[[ir.Node], Sequence[int]]
    rewrite: Callable[[ir.Node, Perm], Rewrite | None]
    broadcast: bool = False


def _first_input(node: ir.Node) -> Sequence[int]:
    return (0,)


def _all_inputs(node: ir.Node) -> Sequence[int]:
    return tuple(range(len(node.inputs)))


def _same(node: ir.Node, p: Perm) -> Rewrite:
    return Rewrite([p] * len(node.outputs))


def _axis_rewrite(node: ir.Node, p: Perm) -> Rewrite:
    axis = normalize_axes([attr(node, "axis", 1 if node.op_type in ("Concat", "Split") else -1)], len(p))[0]
    return Rewrite([p] * len(node.outputs), attrs={"axis": p[axis]})


def _kept_perm(p: Perm, removed: Sequence[int]) -> Perm:
    """Output perm after removing logical axes ``removed`` (whose source axes are p[removed])."""
    source_removed = {p[k] for k in removed}
    kept_source = [j for j in range(len(p)) if j not in source_removed]
    return tuple(kept_source.index(p[k]) for k in range(len(p)) if k not in removed)


def _reduce_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    axes_input = 1 if len(node.inputs) > 1 else None
    axes = input_or_attr(node, 1, "axes")
    if axes_input is not None and axes is None:
        return None  # axes computed at run time
    if not axes:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        axes = list(range(len(p)))
    axes = normalize_axes(axes, len(p))
    new_axes = sorted(p[a] for a in axes)
    out = p if attr(node, "keepdims", 1) else _kept_perm(p, axes)
    if axes_input is not None:
        return Rewrite([out], const_inputs={1: np.array(new_axes, dtype=np.int64)})
    return Rewrite([out], attrs={"axes": new_axes})


def _arg_rewrite(node: ir.Node, p: Perm) -> Rewrite:
    axis = normalize_axes([attr(node, "axis", 0)], len(p))[0]
    out = p if attr(node, "keepdims", 1) else _kept_perm(p, [axis])
    return Rewrite([out], attrs={"axis": p[axis]})


def _pad_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    pads = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None):
        return None
    r = len(p)
    axes = list(range(r)) if axes is None else normalize_axes(axes.tolist(), r)
    begin, end = np.zeros(r, np.int64), np.zeros(r, np.int64)
    n = len(axes)
    for k, a in enumerate(axes):
        begin[p[a]], end[p[a]] = pads[k], pads[k + n]
    edits = {1: np.concatenate([begin, end])}
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        edits[3] = np.arange(r, dtype=np.int64)
    return Rewrite([p], const_inputs=edits)


def _slice_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    params = [constant(v) if v is not None else None for v in node.inputs[1:]]
    starts = params[0]
    if starts is None or any(v is not None and c is None for v, c in zip(node.inputs[1:], params)):
        return None
    axes = params[2] if len(params) > 2 and params[2] is not None else np.arange(len(starts))
    new_axes = np.array([p[a] for a in normalize_axes(axes.tolist(), len(p))], dtype=np.int64)
    return Rewrite([p], const_inputs={3: new_axes})


def _squeeze_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    axes = input_or_attr(node, 1, "axes")
    if axes is None:
        return None  # squeeze-all depends on run-time sizes of the other dims
    axes = normalize_axes(axes, len(p))
    new_axes = np.array(sorted(p[a] for a in axes), dtype=np.int64)
    return Rewrite([_kept_perm(p, axes)], const_inputs={1: new_axes})


def _unsqueeze_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    axes = input_or_attr(node, 1, "axes")
    if axes is None:
        return None
    r, m = len(p), len(axes)
    inserted = sorted(normalize_axes(axes, r + m))
    out, logical = [], 0
    for i in range(r + m):
        if i in inserted:
            out.append(r + inserted.index(i))  # new unit axes go last in the source frame
        else:
            out.append(p[logical])
            logical += 1
    return Rewrite([tuple(out)], const_inputs={1: np.arange(r, r + m, dtype=np.int64)})


def _gather_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    indices = constant(node.inputs[1])
    if indices is None or indices.ndim > 1:
        return None
    axis = normalize_axes([attr(node, "axis", 0)], len(p))[0]
    out = p if indices.ndim == 1 else _kept_perm(p, [axis])
    return Rewrite([out], attrs={"axis": p[axis]})


def _reshape_rewrite(node: ir.Node, p: Perm) -> Rewrite | None:
    """A Reshape that splits or merges only axes the transpose keeps together and in order
    reshapes the source into those groups, in the source's order, and transposes the groups
    after: conv features to tokens and back (``flatten(2).transpose(1, 2)``, attention over
    feature maps) then need no TRANSPOSE of their own. Only where, followed down, it cancels
    or merges: split up it would cost more (attention's q, k and v: three transposes for one,
    none of them foldable into the MatMul)."""
    y, z = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if y is None or z is None or len(y) != len(p) or 0 in z or constant(node.inputs[1]) is None:
        return None
    groups = _reshape_groups(y, z)
    if groups is None:
        return None
    source = [j for j in range(len(p)) if y[p.index(j)] != 1]  # the source's non-unit axes, in order
    starts = []
    for y_axes, _ in groups:
        at = [source.index(p[k]) for k in y_axes]
        if at != list(range(at[0], at[0] + len(at))):
            return None
        starts.append(at[0])
    placed = _leading_units(z) + [axis for _, z_axes in sorted(zip(starts, _with_units(groups, z))) for axis in z_axes]
    after = tuple(placed.index(axis) for axis in range(len(z)))
    left, met = _after_push(node.outputs[0], after, _LOOKAHEAD)
    if left > 1 or (left == 1 and not met):
        return None  # past a Reshape a transpose is no smaller: push it only to cancel or merge
    return Rewrite([after], const_inputs={1: np.array([z[axis] for axis in placed], dtype=np.int64)})


# How many ops down a transpose pushed past a Reshape is followed to count what it becomes.
_LOOKAHEAD = 8


def _after_push(value: ir.Value, perm: Perm, depth: int) -> tuple[int, int]:
    """(left, met) for a transpose by ``perm`` pushed down from ``value`` as far as it goes:
    how many transposes it leaves at the ends of its paths, and how many of the graph's
    costly transposes it merges with on the way."""
    if value.shape is None:
        return 1, 0
    if _moves_only_unit_axes(ir.Shape([value.shape[i] for i in inverse(perm)]), perm):
        return 0, 0  # nothing left to move: a reshape
    if value.is_graph_output() or depth == 0:
        return 1, 0
    left = met = 0
    for user, _ in value.uses():
        rule, own = _rule_for(user), _perm_of(user.outputs[0])
        if own is not None:
            below = _after_push(user.outputs[0], compose(perm, own), depth - 1)
            left, met = left + below[0], met + below[1] + (0 if _free_in_matmul(user.outputs[0], own) else 1)
        elif rule is not None and (rewrite := rule.rewrite(user, perm)) is not None:
            for out, out_perm in zip(user.outputs, rewrite.out_perms):
                if out.uses() or out.is_graph_output():
                    below = _after_push(out, out_perm, depth - 1)
                    left, met = left + below[0], met + below[1]
        else:
            left += 0 if _free_in_matmul(value, perm) else 1
    return left, met


def _free_in_matmul(value: ir.Value, perm: Perm) -> bool:
    """A transpose of the last two axes read only by MatMul: TFLite folds it into the
    BATCH_MATMUL (adjoint flags), so it costs nothing."""
    swap = tuple(range(len(perm) - 2)) + (len(perm) - 1, len(perm) - 2)
    return len(perm) >= 2 and tuple(perm) == swap and all(user.op_type == "MatMul" for user, _ in value.uses())


def _leading_units(z: Sequence[int]) -> list[int]:
    """z's unit axes before its first larger one (the batch): they stay in front."""
    return list(range(next((k for k, d in enumerate(z) if d != 1), len(z))))


def _with_units(groups: list[tuple[list[int], list[int]]], z: Sequence[int]) -> list[list[int]]:
    """Each group's z axes, with the unit axes between groups joining the group after them
    (the ones after the last group joining it), so they travel with their neighbours."""
    lead = len(_leading_units(z))
    ends = [max(z_axes) for _, z_axes in groups]
    return [[k for k in range(ends[g - 1] + 1 if g else lead, ends[g] + 1 if g < len(groups) - 1 else len(z))]
            for g in range(len(groups))]


def _reshape_groups(y: Sequence[int], z: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """The reshape y → z as (y axes, z axes) groups of equal size, unit axes left out."""
    ys, zs = [k for k in range(len(y)) if y[k] != 1], [k for k in range(len(z)) if z[k] != 1]
    groups, i, j = [], 0, 0
    while i < len(ys) and j < len(zs):
        group, size_y, size_z = ([ys[i]], [zs[j]]), y[ys[i]], z[zs[j]]
        i, j = i + 1, j + 1
        while size_y != size_z:
            if size_y < size_z and i < len(ys):
                group[0].append(ys[i])
                size_y, i = size_y * y[ys[i]], i + 1
            elif size_z < size_y and j < len(zs):
                group[1].append(zs[j])
                size_z, j = size_z * z[zs[j]], j + 1
            else:
                return None
        groups.append(group)
    return groups if i == len(ys) and j == len(zs) else None


def _split_inputs(node: ir.Node) -> Sequence[int]:
    return (0,)


_UNARY = (
    "Relu Sigmoid Tanh Erf Exp Log Sqrt Abs Neg Reciprocal Floor Ceil Round Sign Not Cast "
    "HardSigmoid HardSwish LeakyRelu Elu Selu Celu Softplus Softsign Gelu Mish Sin Cos Clip "
    "IsNaN IsInf ThresholdedRelu Shrink"
).split()
_BROADCAST = "Add Sub Mul Div Pow Max Min Mean Sum PRelu Where Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Mod".split()

PUSH_RULES: dict[str, PushRule] = {
    **{op: PushRule(_first_input, _same) for op in _UNARY},
    **{op: PushRule(_all_inputs, _same, broadcast=True) for op in _BROADCAST},
    "Concat": PushRule(_all_inputs, _axis_rewrite),
    "Split": PushRule(_split_inputs, _axis_rewrite),
    "Softmax": PushRule(_first_input, _axis_rewrite),
    "LogSoftmax": PushRule(_first_input, _axis_rewrite),
    "Hardmax": PushRule(_first_input, _axis_rewrite),
    **{op: PushRule(_first_input, _reduce_rewrite) for op in (
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")},
    "ArgMax": PushRule(_first_input, _arg_rewrite),
    "ArgMin": PushRule(_first_input, _arg_rewrite),
    "Pad": PushRule(_first_input, _pad_rewrite),
    "Slice": PushRule(_first_input, _slice_rewrite),
    "Squeeze": PushRule(_first_input, _squeeze_rewrite),
    "Unsqueeze": PushRule(_first_input, _unsqueeze_rewrite),
    "Gather": PushRule(_first_input, _gather_rewrite),
    "Reshape": PushRule(_first_input, _reshape_rewrite),
}


# --- graph edits ----------------------------------------------------------------------------

def _perm_of(value: ir.Value | None) -> Perm | None:
    """The perm of the Transpose producing ``value``, if one does."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = attr(node, "perm")
    return tuple(perm) if perm is not None else tuple(reversed(range(node.inputs[0].shape.rank())))


def _new_transpose(x: ir.Value, perm: Perm) -> ir.Node:
    node = ir.node("Transpose", [x], {"perm": list(perm)})
    node.outputs[0].dtype = x.dtype
    node.outputs[0].shape = permute_shape(x.shape, perm)
    return node


def _set_attr(node: ir.Node, name: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        node.attributes[name] = ir.AttrInt64s(name, [int(v) for v in value])
    else:
        node.attributes[name] = ir.AttrInt64(name, int(value))


def _redirect(old: ir.Value, new: ir.Value, graph: ir.Graph) -> None:
    """Every use of ``old`` (graph outputs included, keeping their names) now reads ``new``."""
    for user, index in list(old.uses()):
        user.replace_input_with(index, new)
    if old.is_graph_output():
        for i, out in enumerate(graph.outputs):
            if out is old:
                graph.outputs[i] = new
        take_name(new, old, graph)


def _transpose_outputs(graph: ir.Graph, node: ir.Node, perms: Sequence[Perm]) -> None:
    """Re-express ``node``'s outputs in its new frame, adding a transpose back for each."""
    for out, perm in zip(node.outputs, perms):
        if is_identity(perm):
            continue
        logical_shape = out.shape
        out.shape = permute_shape(logical_shape, inverse(perm))
        restore = _new_transpose(out, perm)
        users = list(out.uses())
        was_output = out.is_graph_output()
        graph.insert_after(node, restore)
        for user, index in users:
            if user is not restore:
                user.replace_input_with(index, restore.outputs[0])
        if was_output:
            for i, o in enumerate(graph.outputs):
                if o is out:
                    graph.outputs[i] = restore.outputs[0]
            take_name(restore.outputs[0], out, graph)


def _broadcast_constant(array: np.ndarray, p: Perm) -> np.ndarray:
    full = array.reshape((1,) * (len(p) - array.ndim) + array.shape)
    moved = full.transpose(inverse(p))
    while moved.ndim > array.ndim and moved.shape[0] == 1:
        moved = moved[0]
    return moved


def _layout_inputs_ok(node: ir.Node, rule: PushRule, p: Perm) -> bool:
    """Every other layout input can follow: a constant (re-laid out) or a computed tensor
    that is cheap to transpose beside the data that moves (a gate: squeeze-excite, ECA, SK)."""
    moving = _moving_sizes(node, rule, p)
    for i in rule.layout_inputs(node):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or _perm_of(v) == p:
            continue
        data = constant(v)
        if data is None:
            if not _follows_cheaply(v.shape, inverse(p), moving):
                return False
        elif data.ndim > len(p) or (not rule.broadcast and data.ndim != len(p)):
            return False
    return True


# A computed input follows a pushed transpose when it is this many times smaller than the
# data that stops being transposed (the gate of an SK or split-attention block: 1/(H·W)).
_CHEAP_FOLLOWER = 8


def _moving_sizes(node: ir.Node, rule: PushRule, p: Perm) -> list[int]:
    """Sizes of the inputs transposed by ``p`` that really move data (not reshapes)."""
    sources = [node.inputs[i].producer().inputs[0] for i in rule.layout_inputs(node)
               if i < len(node.inputs) and _perm_of(node.inputs[i]) == p]
    return [_size(x.shape) for x in sources if x.shape is not None and x.shape.is_static()
            and not _moves_only_unit_axes(x.shape, p)]


def _follows_cheaply(shape: ir.Shape | None, perm: Perm, moving: list[int]) -> bool:
    """Transposing a tensor of ``shape`` costs little beside pushing real moves of ``moving``
    sizes: a reshape, or a tensor far smaller. Never for unit moves alone, so two gates never
    trade their transposes back and forth."""
    if not moving or shape is None or not shape.is_static() or shape.rank() != len(perm):
        return False
    return _moves_only_unit_axes(shape, perm) or _size(shape) * _CHEAP_FOLLOWER <= min(moving)


def _size(shape: ir.Shape) -> int:
    return int(np.prod([int(d) for d in shape.dims]))


def _moves_only_unit_axes(shape: ir.Shape | None, perm: Perm) -> bool:
    """Transposing a tensor of ``shape`` by ``perm`` keeps its data in order: a reshape."""
    if shape is None or not shape.is_static() or shape.rank() != len(perm):
        return False
    moved = [i for i in perm if shape[i] != 1]
    return moved == sorted(moved)


def _push_down(graph: ir.Graph, node: ir.Node, p: Perm, rule: PushRule, rewrite: Rewrite) -> None:
    for i in rule.layout_inputs(node):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            continue
        if _perm_of(v) == p:
            node.replace_input_with(i, v.producer().inputs[0])
        elif constant(v) is None:
            follow = _new_transpose(v, inverse(p))  # small, or a reshape once the pass ends
            graph.insert_before(node, follow)
            node.replace_input_with(i, follow.outputs[0])
        else:
            moved = _broadcast_constant(constant(v), p)
            node.replace_input_with(i, add_initializer(graph, moved, f"{v.name}_cl"))
    for name, value in rewrite.attrs.items():
        _set_attr(node, name, value)
    for index, array in rewrite.const_inputs.items():
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        node.replace_input_with(index, add_initializer(graph, array, f"{node.name}_in{index}"))
    _transpose_outputs(graph, node, rewrite.out_perms)


# Ops edgec fuses before layout (the exporters' erf GELU after a conv: RepViT, FastViT) move
# with their data like the standard op they compute.
_RULES_BY_DOMAIN = {"": PUSH_RULES, "ai.onnx": PUSH_RULES, FUSED_DOMAIN: {"Gelu": PUSH_RULES["Gelu"]}}


def _rule_for(node: ir.Node) -> PushRule | None:
    return _RULES_BY_DOMAIN.get(node.domain, {}).get(node.op_type)


def _try_push_down(graph: ir.Graph, node: ir.Node) -> bool:
    rule = _rule_for(node)
    if rule is None:
        return False
    perms = {_perm_of(node.inputs[i]) for i in rule.layout_inputs(node) if i < len(node.inputs)} - {None}
    if len(perms) != 1:
        return False
    p = perms.pop()
    if not _layout_inputs_ok(node, rule, p):
        return False
    rewrite = rule.rewrite(node, p)
    if rewrite is None:
        return False
    _push_down(graph, node, p, rule, rewrite)
    return True


def _hoistable(node: ir.Node, perm: Perm) -> int | None:
    """Index of the one non-constant layout input if a transpose can move above ``node``."""
    rule = _rule_for(node)
    if rule is None or len(node.outputs) != 1:
        return None
    dynamic = [i for i in rule.layout_inputs(node) if i < len(node.inputs) and node.inputs[i] is not None
               and not is_constant(node.inputs[i])]
    if len(dynamic) != 1 or node.inputs[dynamic[0]].shape is None or node.inputs[dynamic[0]].shape.rank() != len(perm):
        return None
    back = inverse(perm)
    rewrite = rule.rewrite(node, back)
    if rewrite is None or rewrite.out_perms != [back] or not _constants_fit(node, rule, back):
        return None
    return dynamic[0]


def _constants_fit(node: ir.Node, rule: PushRule, p: Perm) -> bool:
    for i in rule.layout_inputs(node):
        data = constant(node.inputs[i]) if i < len(node.inputs) else None
        if data is not None and (data.ndim > len(p) or (not rule.broadcast and data.ndim != len(p))):
            return False
    return True


def _hoist_reaches_input(value: ir.Value, perm: Perm) -> bool:
    """Moving a transpose up from ``value`` ends at a graph input read by nothing else."""
    while True:
        producer = value.producer()
        if producer is None:
            return value.is_graph_input() and len(value.uses()) == 1 and not value.is_graph_output()
        index = _hoistable(producer, perm)
        if index is None or sole_consumer(value) is None:
            return False
        value = producer.inputs[index]


def _hoist_step(graph: ir.Graph, transpose: ir.Node) -> ir.Node | None:
    """Move ``transpose`` above its producer; return the transpose now in front of it."""
    perm = _perm_of(transpose.outputs[0])
    producer = transpose.inputs[0].producer()
    index = _hoistable(producer, perm) if producer is not None else None
    if index is None:
        return None
    ahead = _new_transpose(producer.inputs[index], perm)
    back = _new_transpose(ahead.outputs[0], inverse(perm))
    graph.insert_before(producer, [ahead, back])
    producer.replace_input_with(index, back.outputs[0])
    rule = _rule_for(producer)
    _push_down(graph, producer, inverse(perm), rule, rule.rewrite(producer, inverse(perm)))
    return ahead


def _hoist_to_input(graph: ir.Graph, transpose: ir.Node) -> bool:
    """Move a stuck transpose up a single-use chain to the graph input in one go, so the
    input can take its layout (moving it part way would only invite pushing it back)."""
    perm = _perm_of(transpose.outputs[0])
    if transpose.inputs[0].producer() is None or not _hoist_reaches_input(transpose.inputs[0], perm):
        return False
    node = transpose
    while node is not None:
        node = _hoist_step(graph, node)
    return True


def _simplify_transpose(graph: ir.Graph, node: ir.Node) -> bool:
    """Fold into a constant, merge with the transpose before, or drop when identity/unused."""
    out, x = node.outputs[0], node.inputs[0]
    perm = _perm_of(out)
    if not out.uses() and not out.is_graph_output():
        graph.remove(node, safe=True)
        return True
    if is_constant(x) and not out.is_graph_output():
        folded = add_initializer(graph, constant(x).transpose(perm), f"{x.name}_t")
        _redirect(out, folded, graph)
        graph.remove(node, safe=True)
        return True
    earlier = _perm_of(x)
    if earlier is not None:
        _set_attr(node, "perm", compose(earlier, perm))
        node.replace_input_with(0, x.producer().inputs[0])
        return True
    if is_identity(perm) and not (x.is_graph_input() and out.is_graph_output()) and not x.is_graph_output():
        _redirect(out, x, graph)
        graph.remove(node, safe=True)
        return True
    return False


def _fold_into_linear(graph: ir.Graph, node: ir.Node) -> bool:
    """``Transpose → Flatten → Gemm/MatMul(const W)``: permute W's rows, drop the transpose."""
    perm = _perm_of(node.outputs[0])
    flatten = sole_consumer(node.outputs[0])
    if perm[0] != 0 or flatten is None or not _flattens_to_2d(flatten):
        return False
    linear = sole_consumer(flatten.outputs[0])
    if linear is None or linear.op_type not in ("Gemm", "MatMul") or linear.inputs[0] is not flatten.outputs[0]:
        return False
    weight = linear.inputs[1]
    data = constant(weight)
    if data is None or data.ndim != 2 or len(weight.uses()) != 1 or attr(linear, "transA", 0):
        return False
    source_shape = [int(d) for d in node.inputs[0].shape.dims[1:]]
    order = np.arange(int(np.prod(source_shape))).reshape(source_shape).transpose([i - 1 for i in perm[1:]]).reshape(-1)
    trans_b = linear.op_type == "Gemm" and attr(linear, "transB", 0)
    moved = np.empty_like(data)
    if trans_b:
        moved[:, order] = data
    else:
        moved[order] = data
    linear.replace_input_with(1, add_initializer(graph, moved, f"{weight.name}_rows"))
    flatten.replace_input_with(0, node.inputs[0])
    return True


def _flattens_to_2d(node: ir.Node) -> bool:
    if node.op_type == "Flatten":
        return attr(node, "axis", 1) == 1
    if node.op_type == "Reshape":
        out = node.outputs[0].shape
        return out is not None and out.rank() == 2 and out[0] == node.inputs[0].shape[0]
    return False


def _absorb_input(graph: ir.Graph, value: ir.Value) -> bool:
    consumers = value.consumers()
    perms = {_perm_of(c.outputs[0]) if c.op_type == "Transpose" else None for c in consumers}
    if not consumers or len(perms) != 1 or None in perms or value.is_graph_output():
        return False
    if any(c.outputs[0].is_graph_output() for c in consumers):
        return False
    perm = perms.pop()
    value.meta[LAYOUT_PERM] = compose(value.meta.get(LAYOUT_PERM, tuple(range(len(perm)))), perm)
    value.shape = permute_shape(value.shape, perm)
    for transpose in consumers:
        _redirect(transpose.outputs[0], value, graph)
        graph.remove(transpose, safe=True)
    return True


def _absorb_output(graph: ir.Graph, index: int) -> bool:
    out = graph.outputs[index]
    perm = _perm_of(out)
    if perm is None:
        return False
    transpose = out.producer()
    inner = transpose.inputs[0]
    if inner.is_graph_input() or inner.is_graph_output() or inner.is_initializer():
        return False
    inner.meta[LAYOUT_PERM] = compose(out.meta.get(LAYOUT_PERM, tuple(range(len(perm)))), inverse(perm))
    graph.outputs[index] = inner
    take_name(inner, out, graph)
    if not out.uses():
        graph.remove(transpose, safe=True)
    return True


def _unit_transpose_as_reshape(graph: ir.Graph, node: ir.Node) -> bool:
    """A transpose that only moves size-1 axes is a (free) reshape."""
    if not _moves_only_unit_axes(node.inputs[0].shape, _perm_of(node.outputs[0])):
        return False
    target = add_initializer(graph, np.array([int(d) for d in node.outputs[0].shape.dims], np.int64), "unit_reshape")
    reshape = ir.node("Reshape", [node.inputs[0], target])
    reshape.outputs[0].dtype = node.outputs[0].dtype
    reshape.outputs[0].shape = node.outputs[0].shape
    graph.insert_after(node, reshape)
    _redirect(node.outputs[0], reshape.outputs[0], graph)
    graph.remove(node, safe=True)
    return True


# --- the pass -------------------------------------------------------------------------------

def _wrap(graph: ir.Graph, node: ir.Node) -> None:
    rank = node.inputs[0].shape.rank()
    into = _new_transpose(node.inputs[0], to_channels_last(rank))
    graph.insert_before(node, into)
    node.replace_input_with(0, into.outputs[0])
    node.domain = CL_DOMAIN
    node.version = 1
    _transpose_outputs(graph, node, [to_channels_first(rank)] + [tuple(range(rank))] * (len(node.outputs) - 1))


def _transposes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")]


def _settle(graph: ir.Graph) -> bool:
    """Push transposes down, merge and fold them, until nothing moves."""
    changed_any = False
    for _ in range(MAX_ROUNDS):
        changed = False
        for node in list(graph):
            if node.graph is None:
                continue  # removed earlier in this sweep
            if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
                changed |= _simplify_transpose(graph, node) or (
                    node.graph is not None and _fold_into_linear(graph, node))
            else:
                changed |= _try_push_down(graph, node)
        changed_any |= changed
        if not changed:
            break
    return changed_any


def _one_round(graph: ir.Graph) -> bool:
    """Settle; then hoist the transposes that could not move down, and absorb at the I/O.

    Hoisting only after settling keeps the two directions from undoing each other: every
    transpose left after settling is stuck below, so moving it up is always a gain.
    """
    changed = _settle(graph)
    for node in _transposes(graph):
        if node.graph is not None:
            changed |= _hoist_to_input(graph, node)
    for value in list(graph.inputs):
        changed |= _absorb_input(graph, value)
    for index in range(len(graph.outputs)):
        changed |= _absorb_output(graph, index)
    return changed


class ChannelsLast(ir.passes.InPlacePass):
    """Move a model to channels-last with as few transposes as its ops allow."""

    name = "channels-last"

    def call(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        wrapped = [n for n in list(graph) if _runs_channels_last(n)]
        if not wrapped:
            return PassOutcome(model, False, {"channels_last_ops": 0, "transposes": len(_transposes(graph))})
        model.opset_imports[CL_DOMAIN] = 1
        for node in wrapped:
            with at("node", f"'{node.name}' ({node.op_type})"):
                _wrap(graph, node)
        inserted = len(_transposes(graph))
        rounds = 0
        while rounds < MAX_ROUNDS and _one_round(graph):
            rounds += 1
        for node in _transposes(graph):
            _unit_transpose_as_reshape(graph, node)
        graph.sort()
        return PassOutcome(model, True, {
            "channels_last_ops": len(wrapped),
            "transposes_inserted": inserted,
            "transposes": len(_transposes(graph)),
            "rounds": rounds,
            "io_perms": io_perms(model),
        })


def io_perms(model: ir.Model) -> dict[str, list[int]]:
    """Inputs/outputs whose stored layout differs from the source: name → perm."""
    values = list(model.graph.inputs) + list(model.graph.outputs)
    return {v.name: list(v.meta[LAYOUT_PERM]) for v in values if LAYOUT_PERM in v.meta}


def expand_channels_last(model: ir.Model) -> ir.Model:
    """A standard-ONNX copy where each channels-last op is Transpose → ONNX op → Transpose.

    Gives the layout pass's output an executable reference (ONNX Runtime), so tests can
    check the pass on its own. Graph I/O stay in their stored layouts.
    """
    copy = model.clone()
    graph = copy.graph
    for node in list(graph):
        if node.domain != CL_DOMAIN:
            continue
        rank = node.inputs[0].shape.rank()
        into = _new_transpose(node.inputs[0], to_channels_first(rank))
        graph.insert_before(node, into)
        node.replace_input_with(0, into.outputs[0])
        node.domain = FUSED_DOMAIN if node.op_type in FUSED_CHANNELS_LAST_OPS else ""
        node.version = None
        _transpose_outputs(graph, node, [to_channels_last(rank)])
    copy.opset_imports.pop(CL_DOMAIN, None)
    return copy
