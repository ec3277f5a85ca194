"""The channel dependency graph: which tensor axes must lose the same channels together.

Removing output channel *c* of a conv is not one edit but a group of them: the conv's weight
and bias, every elementwise op after it, the input channels of every consumer, and through
residual Add/Mul, Concat, depthwise convs, squeeze-excite gates, Flatten→Gemm, Split/Slice
and Transpose everything coupled to it. Torch-Pruning builds that graph for PyTorch modules;
this module builds it on the ONNX IR with one rule per op type (:data:`RULES`) and one walk.

Model: every output channel of a prunable layer (Conv, ConvTranspose, Gemm, MatMul with a
constant weight) is an *atom*. Each tensor on the way records, along its channel axis, the
atom held by every position (:class:`Dim`); positions that come from elsewhere (graph inputs,
padding) hold the fixed atom 0. Ops that combine two tensors position by position (Add, Mul,
Concat along another axis...) *unite* their atoms, so the classes of the union-find are the
channels that can only be removed together. A class united with atom 0 is *frozen*, with the
reason recorded: it reaches a graph output, a Reshape that mixes channels, an unsupported op.

Example — Conv(3→4) → Relu → Add(·, Conv(3→4)) → Conv(4→2)::

    conv1.out  atoms 1 2 3 4      conv2.out  atoms 5 6 7 8
    add.out    atoms 1 2 3 4      classes {1,5} {2,6} {3,7} {4,8}: one group, 4 channels
    removing class {2,6} slices conv1/conv2 weight rows 1 and conv3's input column 1.

Each rule has two halves: ``propagate`` (label the node's outputs, unite or freeze atoms)
and ``prune`` (edit the node's constants for the kept positions); shapes of every labeled
tensor are then shrunk in one place (:meth:`ChannelGraph.apply`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from edgec.graph import add_initializer, attr, constant, normalize_axes, replace_initializer_data, static_shape

FIXED = 0  # the atom of positions that can never be removed


@dataclasses.dataclass(frozen=True)
class Dim:
    """A tensor's channel axis and, per position along it, the atom it holds."""

    axis: int
    atoms: np.ndarray  # int64, FIXED for positions that are never removed


@dataclasses.dataclass(frozen=True)
class Source:
    """A layer whose output channels are atoms ``first .. first + count - 1``."""

    node: ir.Node
    first: int
    count: int

    @property
    def atoms(self) -> np.ndarray:
        return np.arange(self.first, self.first + self.count)


def _find(parent: list[int], atom: int) -> int:
    """Union-find root of ``atom`` in ``parent``, compressing the path."""
    root = atom
    while parent[root] != root:
        root = parent[root]
    while parent[atom] != root:
        parent[atom], atom = root, parent[atom]
    return root


class ChannelGraph:
    """Atoms, their union-find classes, and the channel axis of every labeled tensor."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.parent: list[int] = [FIXED]
        # The same unions without the fixed atom: which atoms were coupled, frozen or not, so a
        # layer coupled to a frozen one (a residual branch) is told the frozen one's reason.
        self.coupled: list[int] = [FIXED]
        self.why: dict[int, set[str]] = {}  # coupled class root → why it met a fixed position
        self.dims: dict[ir.Value, Dim] = {}
        self._roots: dict[ir.Value, np.ndarray] = {}  # class root of each channel position, until a union
        self._all_roots: tuple[list[ir.Value], np.ndarray, np.ndarray] | None = None  # the same, end to end
        self.sources: list[Source] = []
        self.owner: list[int] = [-1]  # atom → index of its source
        for node in graph:
            rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                self.freeze_inputs(node, f"{node.op_type} '{node.name}' has no channel rule")
            else:
                rule.propagate(node, self)
        for value in graph.outputs:
            self.freeze(value, "reaches a graph output")

    # -- building ------------------------------------------------------------------------
    def new_atoms(self, count: int, owner: int = -1) -> np.ndarray:
        """``count`` fresh atoms, each its own class; ``owner`` is the source they belong to
        (-1: positions no layer computes, e.g. padding, which cost and score nothing)."""
        first = len(self.parent)
        self.parent.extend(range(first, first + count))
        self.coupled.extend(range(first, first + count))
        self.owner.extend([owner] * count)
        return np.arange(first, first + count, dtype=np.int64)

    def new_source(self, node: ir.Node, count: int) -> np.ndarray:
        atoms = self.new_atoms(count, len(self.sources))
        self.sources.append(Source(node, int(atoms[0]) if count else len(self.parent), count))
        return atoms

    def find(self, atom: int) -> int:
        return _find(self.parent, atom)

    def unite(self, a: np.ndarray, b: np.ndarray, reason: str) -> None:
        """Couple position by position; a class that meets the fixed atom records ``reason``."""
        for x, y in zip(a.tolist(), b.tolist()):
            if FIXED in (x, y) and x != y:
                self.why.setdefault(_find(self.coupled, x or y), {reason})
            elif FIXED not in (x, y):
                self._couple(x, y)
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            low, high = min(rx, ry), max(rx, ry)  # FIXED (0) stays the root of its class
            self.parent[high] = low
            self._roots.clear()
            self._all_roots = None

    def _couple(self, x: int, y: int) -> None:
        rx, ry = _find(self.coupled, x), _find(self.coupled, y)
        if rx != ry:
            low, high = min(rx, ry), max(rx, ry)
            self.coupled[high] = low
            if high in self.why:
                self.why[low] = self.why.get(low, set()) | self.why.pop(high)

    def freeze(self, value: ir.Value | None, reason: str) -> None:
        dim = self.dims.get(value) if value is not None else None
        if dim is not None:
            self.unite(dim.atoms, np.zeros_like(dim.atoms), reason)

    def freeze_inputs(self, node: ir.Node, reason: str) -> None:
        for value in node.inputs:
            self.freeze(value, reason)

    def label(self, value: ir.Value, axis: int, atoms: np.ndarray) -> None:
        self.dims[value] = Dim(axis, np.asarray(atoms, dtype=np.int64))
        self._roots.pop(value, None)
        self._all_roots = None

    def frozen(self, atom: int) -> bool:
        return self.find(atom) == FIXED

    def frozen_reasons(self, atoms: Iterable[int]) -> list[str]:
        """Why these atoms' classes are frozen: the reasons recorded where any atom coupled
        with them met a fixed position."""
        roots = {_find(self.coupled, a) for a in atoms}
        return sorted(set().union(*(self.why.get(r, set()) for r in roots)))

    # -- pruning -------------------------------------------------------------------------
    def roots(self, value: ir.Value) -> np.ndarray:
        """The class root of each position of ``value``'s channel axis (which must have one).

        Kept until the next union: a search for removal counts asks for every tensor's
        positions hundreds of times (DenseNet-121: 528,000 times, 153 million finds)."""
        if value not in self._roots:
            self._roots[value] = np.array([self.find(a) for a in self.dims[value].atoms.tolist()], dtype=np.int64)
        return self._roots[value]

    def keep(self, value: ir.Value, removed: set[int]) -> np.ndarray | None:
        """Which positions of ``value``'s channel axis stay, or None if it has no channel axis."""
        if value not in self.dims:
            return None
        return ~np.isin(self.roots(value), list(removed)) if removed else np.ones(len(self.dims[value].atoms), dtype=bool)

    def masks(self, removed: set[int]) -> dict[ir.Value, np.ndarray]:
        """:meth:`keep` of every tensor with a channel axis, from one lookup of ``removed``."""
        gone = self._gone(removed)
        return {value: ~gone[self.roots(value)] for value in self.dims}

    def spare_emptied(self, removed: set[int], priority: Callable[[int], float]) -> set[int]:
        """``removed`` minus, for each tensor it would leave with no channel at all (a split
        part, a slice), the class among them that ranks highest by ``priority``."""
        removed = set(removed)
        for value in self._emptied(removed):  # sparing only brings channels back: recheck the empty ones
            if not self.keep(value, removed).any():
                removed.discard(max(set(self.roots(value).tolist()), key=priority))
        return removed

    def kept_counts(self, roots: np.ndarray, starts: np.ndarray, removed: set[int]) -> np.ndarray:
        """Per segment of ``roots`` (class roots end to end, segments beginning at ``starts``,
        none empty), how many positions ``removed`` leaves: one lookup for many tensors."""
        return np.add.reduceat(~self._gone(removed)[roots], starts, dtype=np.int64)

    def _gone(self, removed: set[int]) -> np.ndarray:
        """Per atom, whether it is a root in ``removed``: one lookup array for many tensors."""
        gone = np.zeros(len(self.parent), dtype=bool)
        gone[list(removed)] = True
        return gone

    def _emptied(self, removed: set[int]) -> list[ir.Value]:
        """The labeled tensors with channels that ``removed`` leaves with none, in label order."""
        if self._all_roots is None:
            values = [v for v, dim in self.dims.items() if len(dim.atoms)]
            self._all_roots = values, *self.concatenated_roots(values)
        values, roots, starts = self._all_roots
        return [v for v, kept in zip(values, self.kept_counts(roots, starts, removed)) if not kept] if values else []

    def concatenated_roots(self, values: list[ir.Value]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`roots` of ``values`` end to end, and where each begins."""
        parts = [self.roots(v) for v in values]
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64), starts

    def apply(self, removed: set[int]) -> None:
        """Remove the classes whose roots are ``removed``: constants first, then shapes."""
        keep = self.masks(removed)
        for node in list(self.graph):
            rule = RULES.get(node.op_type)
            if rule is not None and rule.prune is not None:
                rule.prune(node, Edit(self.graph, self.dims, keep))
        for value, mask in keep.items():
            if mask is not None and not mask.all() and value.shape is not None:
                dims = list(value.shape.dims)
                dims[self.dims[value].axis] = int(mask.sum())
                value.shape = ir.Shape(dims)


@dataclasses.dataclass
class Edit:
    """What a rule's ``prune`` half sees: the graph and the kept positions of each tensor."""

    graph: ir.Graph
    dims: dict[ir.Value, Dim]
    masks: dict[ir.Value, np.ndarray | None]

    def mask(self, value: ir.Value | None) -> np.ndarray | None:
        mask = self.masks.get(value) if value is not None else None
        return None if mask is None or mask.all() else mask

    def take(self, node: ir.Node, index: int, axis: int, mask: np.ndarray | None) -> None:
        """Keep ``mask``'s entries of input ``index`` (a constant) along ``axis``."""
        if mask is not None and index < len(node.inputs) and node.inputs[index] is not None:
            self.set_constant(node, index, np.compress(mask, constant(node.inputs[index]), axis=axis))

    def set_constant(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """New data for a constant input (added if missing); a constant shared with other
        nodes is copied, and dropped once no node reads it any more."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and value.is_initializer() and len(value.uses()) == 1 and not value.is_graph_output():
            replace_initializer_data(value, array)
            return
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, add_initializer(self.graph, array, f"{value.name if value else node.name}_pruned"))
        if value is not None and value.is_initializer() and not value.uses() and not value.is_graph_output():
            self.graph.initializers.pop(value.name)


@dataclasses.dataclass(frozen=True)
class ChannelRule:
    """How one op type moves channels (``propagate``) and what it edits when they go (``prune``)."""

    propagate: Callable[[ir.Node, ChannelGraph], None]
    prune: Callable[[ir.Node, Edit], None] | None = None


# --- layers: where atoms are born and where input channels are consumed -------------------

def _unsupported(node: ir.Node, graph: ChannelGraph, why: str) -> None:
    graph.freeze_inputs(node, f"{node.op_type} '{node.name}': {why}")


def _own_constant(value: ir.Value | None) -> bool:
    """A constant that is not a graph input (an initializer shared with other nodes is
    copied when it is edited, see :meth:`Edit.set_constant`)."""
    return value is not None and constant(value) is not None and not value.is_graph_input()


def _expect_axis(node: ir.Node, graph: ChannelGraph, value: ir.Value, axis: int) -> bool:
    """True if ``value`` is unlabeled or labeled on ``axis``; otherwise freezes it."""
    dim = graph.dims.get(value)
    if dim is not None and dim.axis != axis:
        _unsupported(node, graph, f"channels arrive on axis {dim.axis}, not {axis}")
        return False
    return True


def _bias_ok(node: ir.Node) -> bool:
    return len(node.inputs) < 3 or node.inputs[2] is None or _own_constant(node.inputs[2])


def _conv_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    weight = constant(node.inputs[1])
    if not _own_constant(node.inputs[1]) or not _bias_ok(node):
        return _unsupported(node, graph, "weight or bias is not a constant")
    if not _expect_axis(node, graph, node.inputs[0], 1):
        return
    group, out_channels = attr(node, "group", 1), weight.shape[0]
    in_channels = weight.shape[1] * group
    if group == 1:
        graph.label(node.outputs[0], 1, graph.new_source(node, out_channels))
    elif group == in_channels == out_channels:  # depthwise: channel c in, channel c out
        dim = graph.dims.get(node.inputs[0])
        if dim is not None:
            graph.label(node.outputs[0], 1, dim.atoms)
    else:
        _unsupported(node, graph, f"grouped convolution (group={group}) is not pruned")


def _conv_prune(node: ir.Node, edit: Edit) -> None:
    out_mask = edit.mask(node.outputs[0])
    if attr(node, "group", 1) == 1:
        edit.take(node, 1, 1, edit.mask(node.inputs[0]))
    elif out_mask is not None:
        node.attributes["group"] = ir.AttrInt64("group", int(out_mask.sum()))
    edit.take(node, 1, 0, out_mask)
    edit.take(node, 2, 0, out_mask)


def _conv_transpose_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    if not _own_constant(node.inputs[1]) or not _bias_ok(node) or attr(node, "group", 1) != 1:
        return _unsupported(node, graph, "only ungrouped ConvTranspose with constant weights is pruned")
    if _expect_axis(node, graph, node.inputs[0], 1):
        graph.label(node.outputs[0], 1, graph.new_source(node, constant(node.inputs[1]).shape[1]))


def _conv_transpose_prune(node: ir.Node, edit: Edit) -> None:
    out_mask = edit.mask(node.outputs[0])
    edit.take(node, 1, 0, edit.mask(node.inputs[0]))
    edit.take(node, 1, 1, out_mask)
    edit.take(node, 2, 0, out_mask)


def _gemm_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    weight = constant(node.inputs[1])
    if attr(node, "transA", 0) or not _own_constant(node.inputs[1]) or weight.ndim != 2 or not _bias_ok(node):
        return _unsupported(node, graph, "only Gemm with a constant B and no transA is pruned")
    if _expect_axis(node, graph, node.inputs[0], 1):
        out_axis = 0 if attr(node, "transB", 0) else 1
        graph.label(node.outputs[0], 1, graph.new_source(node, weight.shape[out_axis]))


def _gemm_prune(node: ir.Node, edit: Edit) -> None:
    in_axis, out_axis = (1, 0) if attr(node, "transB", 0) else (0, 1)
    out_mask = edit.mask(node.outputs[0])
    edit.take(node, 1, in_axis, edit.mask(node.inputs[0]))
    edit.take(node, 1, out_axis, out_mask)
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if bias is not None and bias.ndim and bias.shape[-1] > 1:
        edit.take(node, 2, bias.ndim - 1, out_mask)


def _matmul_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    weight = constant(node.inputs[1])
    if weight is None or weight.ndim != 2 or not _own_constant(node.inputs[1]) or static_shape(node.inputs[0]) is None:
        return _unsupported(node, graph, "only MatMul by a constant matrix is pruned")
    last = len(static_shape(node.inputs[0])) - 1
    if _expect_axis(node, graph, node.inputs[0], last):
        graph.label(node.outputs[0], last, graph.new_source(node, weight.shape[1]))


def _matmul_prune(node: ir.Node, edit: Edit) -> None:
    edit.take(node, 1, 0, edit.mask(node.inputs[0]))
    edit.take(node, 1, 1, edit.mask(node.outputs[0]))


# --- ops that pass channels through -------------------------------------------------------

def _passthrough(node: ir.Node, graph: ChannelGraph) -> None:
    """Elementwise and spatial ops: output channel c is input channel c."""
    dim = graph.dims.get(node.inputs[0])
    if dim is not None:
        graph.label(node.outputs[0], dim.axis, dim.atoms)
    for value in node.inputs[1:]:
        graph.freeze(value, f"{node.op_type} '{node.name}' reads channels as a parameter")


def _broadcast_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    """Add/Mul/Sub/Div/PRelu/...: inputs aligned from the right; full-size channel axes of
    two tensors are coupled (residuals, squeeze-excite gates), constants are sliced."""
    out_shape = static_shape(node.outputs[0])
    labeled = [(v, graph.dims[v]) for v in node.inputs if v is not None and v in graph.dims]
    if not labeled:
        return
    if out_shape is None:
        return _unsupported(node, graph, "output shape unknown")
    first, dim = labeled[0]
    axis = dim.axis + len(out_shape) - len(static_shape(first))
    if out_shape[axis] != len(dim.atoms):
        return _unsupported(node, graph, "channels are broadcast")
    for value in node.inputs:
        if value is None or value is first:
            continue
        aligned = _aligned_axis(value, axis, len(out_shape))
        if aligned is None:
            continue
        other = graph.dims.get(value)
        if other is not None and other.axis == aligned:
            graph.unite(dim.atoms, other.atoms, f"{node.op_type} '{node.name}' combines it with fixed channels")
        elif other is not None or constant(value) is None:
            graph.freeze(first, f"{node.op_type} '{node.name}' combines it with channels that cannot be pruned")
            graph.freeze(value, f"{node.op_type} '{node.name}' combines it with channels that cannot be pruned")
    graph.label(node.outputs[0], axis, dim.atoms)


def _aligned_axis(value: ir.Value, out_axis: int, out_rank: int) -> int | None:
    """The axis of ``value`` that broadcasts onto ``out_axis``, or None if it has size 1 there."""
    shape = static_shape(value) or ()
    axis = out_axis - (out_rank - len(shape))
    return axis if axis >= 0 and shape[axis] != 1 else None


def _broadcast_prune(node: ir.Node, edit: Edit) -> None:
    mask = edit.mask(node.outputs[0])
    if mask is None:
        return
    out_axis, out_rank = edit.dims[node.outputs[0]].axis, len(node.outputs[0].shape)
    for index, value in enumerate(node.inputs):
        if value is not None and constant(value) is not None:
            aligned = _aligned_axis(value, out_axis, out_rank)
            if aligned is not None:
                edit.take(node, index, aligned, mask)

def _per_channel_prune(node: ir.Node, edit: Edit) -> None:
    """BatchNormalization/InstanceNormalization: every parameter input is one value per channel."""
    mask = edit.mask(node.outputs[0])
    for index in range(1, len(node.inputs)):
        edit.take(node, index, 0, mask)


def _per_channel_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    if _expect_axis(node, graph, node.inputs[0], 1):
        if not all(_own_constant(v) for v in node.inputs[1:] if v is not None):
            return _unsupported(node, graph, "per-channel parameters are not constants")
        _passthrough(node, graph)


def _transpose_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    dim = graph.dims.get(node.inputs[0])
    if dim is not None:
        perm = attr(node, "perm") or list(reversed(range(len(static_shape(node.inputs[0])))))
        graph.label(node.outputs[0], perm.index(dim.axis), dim.atoms)


def _reduce_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    """ReduceMean & co. over other axes keep channels (shifting the axis if dims are dropped)."""
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    rank = len(static_shape(node.inputs[0]) or ())
    axes = _input_or_attr_list(node, 1, "axes")
    reduced = normalize_axes(axes, rank) if axes else ([] if attr(node, "noop_with_empty_axes", 0) else list(range(rank)))
    if dim.axis in reduced:
        return _unsupported(node, graph, "reduces over the channel axis")
    keepdims = attr(node, "keepdims", 1)
    axis = dim.axis if keepdims else dim.axis - sum(a < dim.axis for a in reduced)
    graph.label(node.outputs[0], axis, dim.atoms)


def _input_or_attr_list(node: ir.Node, index: int, name: str) -> list[int] | None:
    if index < len(node.inputs) and node.inputs[index] is not None:
        data = constant(node.inputs[index])
        return None if data is None else [int(x) for x in np.ravel(data)]
    value = attr(node, name)
    return None if value is None else list(value)


def _concat_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    """Along the channel axis, positions are laid end to end (offset bookkeeping); along any
    other axis, the inputs' channels are coupled position by position."""
    shape = static_shape(node.outputs[0])
    labeled = [graph.dims[v] for v in node.inputs if v in graph.dims]
    if not labeled:
        return
    if shape is None:
        return _unsupported(node, graph, "output shape unknown")
    axis = normalize_axes([attr(node, "axis")], len(shape))[0]
    if all(d.axis == axis for d in labeled):
        parts = [graph.dims[v].atoms if v in graph.dims else np.zeros(static_shape(v)[axis], dtype=np.int64) for v in node.inputs]
        return graph.label(node.outputs[0], axis, np.concatenate(parts))
    _broadcast_propagate(node, graph)


def _concat_prune(node: ir.Node, edit: Edit) -> None:
    """Along the concat axis only shapes change; along another, constants are sliced."""
    dim = edit.dims.get(node.outputs[0])
    if dim is not None and dim.axis != normalize_axes([attr(node, "axis")], len(node.outputs[0].shape))[0]:
        _broadcast_prune(node, edit)


def _split_sizes(node: ir.Node, length: int) -> list[int] | None:
    sizes = _input_or_attr_list(node, 1, "split")
    if sizes is not None:
        return sizes
    count = len(node.outputs)
    return [math.ceil(length / count)] * (count - 1) + [length - math.ceil(length / count) * (count - 1)]


def _split_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    rank = len(static_shape(node.inputs[0]))
    if normalize_axes([attr(node, "axis", 0)], rank)[0] != dim.axis:
        for output in node.outputs:
            graph.label(output, dim.axis, dim.atoms)
        return
    sizes = _split_sizes(node, len(dim.atoms))
    if sizes is None or len(node.inputs) > 1 and not _own_constant(node.inputs[1]):
        return _unsupported(node, graph, "split sizes are not a constant of its own")
    for output, start, size in zip(node.outputs, np.cumsum([0, *sizes]), sizes):
        graph.label(output, dim.axis, dim.atoms[start:start + size])


def _split_prune(node: ir.Node, edit: Edit) -> None:
    masks = [edit.masks.get(output) for output in node.outputs]
    dim = edit.dims.get(node.inputs[0])
    if dim is None or edit.mask(node.inputs[0]) is None or any(edit.dims[o].axis != dim.axis for o in node.outputs):
        return
    if normalize_axes([attr(node, "axis", 0)], len(node.inputs[0].shape))[0] != dim.axis:
        return
    sizes = np.array([int(m.sum()) for m in masks], dtype=np.int64)
    node.attributes.pop("num_outputs", None)
    edit.set_constant(node, 1, sizes)


def _slice_params(node: ir.Node, rank: int) -> list[tuple[int, int, int, int]] | None:
    """(axis, start, end, step) per sliced axis, or None if any is not constant."""
    starts, ends = _input_or_attr_list(node, 1, "starts"), _input_or_attr_list(node, 2, "ends")
    axes = _input_or_attr_list(node, 3, "axes") or list(range(len(starts or [])))
    steps = _input_or_attr_list(node, 4, "steps") or [1] * len(axes)
    if starts is None or ends is None:
        return None
    return list(zip(normalize_axes(axes, rank), starts, ends, steps))


def _slice_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    params = _slice_params(node, len(static_shape(node.inputs[0])))
    if params is None or not all(_own_constant(v) for v in node.inputs[1:] if v is not None):
        return _unsupported(node, graph, "slice bounds are not constants")
    mine = [p for p in params if p[0] == dim.axis]
    if not mine:
        return graph.label(node.outputs[0], dim.axis, dim.atoms)
    _, start, end, step = mine[0]
    if step != 1:
        return _unsupported(node, graph, "slices the channel axis with a step")
    graph.label(node.outputs[0], dim.axis, dim.atoms[slice(start, end)])


def _slice_prune(node: ir.Node, edit: Edit) -> None:
    dim, mask = edit.dims.get(node.inputs[0]), edit.mask(node.inputs[0])
    if dim is None or mask is None:
        return
    params = _slice_params(node, len(node.inputs[0].shape))
    for position, (axis, start, end, _) in enumerate(params):
        if axis == dim.axis:
            begin, stop, _ = slice(start, end).indices(len(mask))
            new_start = int(mask[:begin].sum())
            _set_entry(node, edit, 1, position, new_start)
            _set_entry(node, edit, 2, position, new_start + int(mask[begin:stop].sum()))


def _set_entry(node: ir.Node, edit: Edit, index: int, position: int, value: int) -> None:
    array = constant(node.inputs[index]).copy()
    array[position] = value
    edit.set_constant(node, index, array)


def _pad_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    """Constant padding of the channel axis (tf2onnx's "channel growth" before a residual
    Add) adds positions of their own: removing one shortens the padding."""
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    pads, rank = _input_or_attr_list(node, 1, "pads"), len(static_shape(node.inputs[0]))
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return _unsupported(node, graph, "pads are not constant or name axes")
    before, after = pads[dim.axis], pads[dim.axis + rank]
    if (before or after) and (attr(node, "mode", "constant") != "constant" or before < 0 or after < 0):
        return _unsupported(node, graph, "pads the channel axis other than with constants")
    atoms = np.concatenate([graph.new_atoms(before), dim.atoms, graph.new_atoms(after)])
    graph.label(node.outputs[0], dim.axis, atoms)


def _pad_prune(node: ir.Node, edit: Edit) -> None:
    mask, dim = edit.mask(node.outputs[0]), edit.dims.get(node.outputs[0])
    if mask is None:
        return
    rank = len(node.outputs[0].shape)
    pads = constant(node.inputs[1]).copy()
    before, after = int(pads[dim.axis]), int(pads[dim.axis + rank])
    pads[dim.axis], pads[dim.axis + rank] = mask[:before].sum(), mask[len(mask) - after:].sum()
    edit.set_constant(node, 1, pads)


def _resize_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    scales, sizes = _input_or_attr_list(node, 2, "scales"), _input_or_attr_list(node, 3, "sizes")
    if sizes and (len(node.inputs) < 4 or not _own_constant(node.inputs[3])):
        return _unsupported(node, graph, "output sizes are not a constant of its own")
    if (scales and scales[dim.axis] != 1) or (sizes and sizes[dim.axis] != len(dim.atoms)):
        return _unsupported(node, graph, "resizes the channel axis")
    graph.label(node.outputs[0], dim.axis, dim.atoms)


def _resize_prune(node: ir.Node, edit: Edit) -> None:
    mask = edit.mask(node.inputs[0])
    if mask is not None and len(node.inputs) > 3 and node.inputs[3] is not None:
        _set_entry(node, edit, 3, edit.dims[node.inputs[0]].axis, int(mask.sum()))


def _reshape_propagate(node: ir.Node, graph: ChannelGraph) -> None:
    """Reshape/Flatten/Squeeze/Unsqueeze keep channels when the channel axis stays the outer
    one of whatever it merges with: channel c then becomes a block of ``inner`` positions
    (Flatten → Gemm: H·W columns per channel). Any other reshape mixes channels: frozen."""
    dim = graph.dims.get(node.inputs[0])
    if dim is None:
        return
    mapped = _reshape_axis(static_shape(node.inputs[0]), static_shape(node.outputs[0]), dim.axis)
    if mapped is None:
        return _unsupported(node, graph, "reshape mixes channels with other axes")
    if node.op_type == "Reshape" and not _own_constant(node.inputs[1]):
        return _unsupported(node, graph, "target shape is not a constant")
    axis, inner = mapped
    graph.label(node.outputs[0], axis, np.repeat(dim.atoms, inner))


def _reshape_axis(shape_in: tuple[int, ...] | None, shape_out: tuple[int, ...] | None, axis: int) -> tuple[int, int] | None:
    """(output axis, positions per channel) if channel ``axis`` survives the reshape whole."""
    if shape_in is None or shape_out is None:
        return None
    outer, channels = math.prod(shape_in[:axis]), shape_in[axis]
    for out_axis in range(len(shape_out)):
        if math.prod(shape_out[:out_axis]) != outer or shape_out[out_axis] % channels:
            continue
        inner = shape_out[out_axis] // channels
        tail = [math.prod(shape_in[axis + 1:axis + 1 + k]) for k in range(len(shape_in) - axis)]
        if inner in tail:
            return out_axis, inner
    return None


def _reshape_prune(node: ir.Node, edit: Edit) -> None:
    mask = edit.mask(node.outputs[0])
    if node.op_type == "Reshape" and mask is not None:
        axis = edit.dims[node.outputs[0]].axis
        if constant(node.inputs[1])[axis] > 0:
            _set_entry(node, edit, 1, axis, int(mask.sum()))


PASSTHROUGH_OPS = (
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh",
    "Softplus", "Softsign", "Erf", "Neg", "Abs", "Exp", "Gelu", "Mish", "Identity", "Dropout",
    "Sqrt", "Reciprocal", "Log", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Cast", "ThresholdedRelu", "Shrink",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
)
BROADCAST_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum")  # Pow: GELU's tanh form (GPT-2)

RULES: dict[str, ChannelRule] = {
    "Conv": ChannelRule(_conv_propagate, _conv_prune),
    "ConvTranspose": ChannelRule(_conv_transpose_propagate, _conv_transpose_prune),
    "Gemm": ChannelRule(_gemm_propagate, _gemm_prune),
    "MatMul": ChannelRule(_matmul_propagate, _matmul_prune),
    **{op: ChannelRule(_passthrough) for op in PASSTHROUGH_OPS},
    **{op: ChannelRule(_broadcast_propagate, _broadcast_prune) for op in BROADCAST_OPS},
    "BatchNormalization": ChannelRule(_per_channel_propagate, _per_channel_prune),
    "InstanceNormalization": ChannelRule(_per_channel_propagate, _per_channel_prune),
    "Transpose": ChannelRule(_transpose_propagate),
    **{op: ChannelRule(_reduce_propagate) for op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum")},
    "Concat": ChannelRule(_concat_propagate, _concat_prune),
    "Split": ChannelRule(_split_propagate, _split_prune),
    "Slice": ChannelRule(_slice_propagate, _slice_prune),
    "Pad": ChannelRule(_pad_propagate, _pad_prune),
    "Resize": ChannelRule(_resize_propagate, _resize_prune),
    **{op: ChannelRule(_reshape_propagate, _reshape_prune) for op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")},
}
