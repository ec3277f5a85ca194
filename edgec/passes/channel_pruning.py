"""Structured channel pruning: remove whole channel groups, then re-fit what reads them.

The dependency graph (:mod:`edgec.passes.channels`) says which channels must go together;
this pass decides which go and makes the model work without them:

1. **Groups.** Layers whose channels are coupled (a residual stream, a conv and the depthwise
   conv after it, an SE gate and what it gates) form one group; a group's channel is a class
   of coupled atoms. Frozen classes (reaching an output, a mixing Reshape...) never go.
2. **Importance** of a channel: the L1 or L2 norm of its producers' weights, summed over the
   coupled producers, or the mean |activation| of those producers on calibration data; or,
   with ``importance="gates"``, the L2 norm after a training step learned a gate per channel
   under an L1 penalty and folded it into the weights (:mod:`edgec.train.gates`; the recipe
   puts that step before this pass, so this pass only reads the weights it left).
3. **How many:** ``rate`` of each group's channels (``scope="local"``), or the ``rate``
   least important channels of the whole model, each group's scores divided by their mean so
   groups compare (``scope="global"``); or the rate that removes ``mac_reduction`` of the
   MACs, found by bisection on exact MAC counts. Kept counts are rounded up to ``round_to``.
4. **Reconstruction** (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural
   Networks"; ThiNet): every layer that lost input channels is re-fitted by least squares so
   its outputs on calibration data match the *original* model's outputs of that layer. The
   inputs come from the pruned model with the layers before already re-fitted, so errors do
   not pile up along the network. The fit solves for the change from the pruned weights with
   a ridge, so a layer with few calibration rows stays near its pruned weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgec.activations import Walk, capture
from edgec.analysis import MAC_COUNTERS
from edgec.checks import above, at_least
from edgec.errors import EdgecWarning, RecipeError
from edgec.graph import attr, constant, replace_initializer_data, set_bias
from edgec.passes.channels import FIXED, ChannelGraph, Source
from edgec.passes.layers import LayerSelection, select_layers
from edgec.passes.pipeline import PassOutcome
from edgec.refit import least_squares, output_rows, patches
from edgec.verify import Sample

# What the pass scores by itself; "gates" ranks by weights a training step left (the recipe puts it first).
OWN_IMPORTANCE = ("l1", "l2", "activation")
IMPORTANCE = (*OWN_IMPORTANCE, "gates")
SCOPES = ("local", "global")
MAX_FIT_ROWS = 16384  # rows sampled per re-fit: enough for ~1k features, ~100 MB in float64
RIDGE = 1e-3  # relative ridge of the re-fit, pulling toward the pruned weights


@dataclasses.dataclass(frozen=True)
class ChannelPruningOptions:
    """``rate``: fraction of each group's channels removed (or of all channels with
    ``scope="global"``), overridden per group by ``rates`` (layer-name pattern → rate, e.g.
    from ``edgec analyze --sensitivity``; the first pattern matching one of a group's layers
    wins); ``mac_reduction`` instead: fraction of the MACs to remove (the rate is searched).
    Layers to prune are chosen by ``op_types``/``include``/``exclude`` (a group is pruned
    when all its layers are chosen)."""

    rate: float | None = None
    rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    mac_reduction: float | None = None
    importance: str = "l2"
    scope: str = "local"
    # Kept counts are multiples of this: ORT's x86 conv kernels block channels by 8, and
    # MobileNetV2 pruned to odd counts ran 2.3x *slower* than unpruned (0.52 vs 0.23 ms),
    # 1.35x faster with multiples of 8.
    round_to: int = 8
    reconstruct: bool = True
    op_types: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    # importance="gates": the L1 penalty and epochs of the gate-training step run before this pass.
    gate_penalty: float = 1.0
    gate_epochs: int = 4

    def __post_init__(self) -> None:
        if (self.rate is None and not self.rates) == (self.mac_reduction is None):
            raise ValueError("give either rate (and/or rates) or mac_reduction")
        if self.rates and self.scope == "global":
            raise ValueError("per-layer rates and scope='global' exclude each other")
        values = {"rate": self.rate, "mac_reduction": self.mac_reduction, **{f"rates['{k}']": v for k, v in self.rates.items()}}
        for name, value in values.items():
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be a number in [0, 1), not {value!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, not {self.importance!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, not {self.round_to!r}")
        above("gate_penalty", self.gate_penalty, 0)
        at_least("gate_epochs", self.gate_epochs, 1)

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(self.op_types, self.include, self.exclude)

    @property
    def needs_data(self) -> bool:
        return self.reconstruct or self.importance == "activation"


@dataclasses.dataclass
class Group:
    """Layers whose output channels are coupled, and the classes (channels) they share."""

    sources: list[Source]
    classes: list[int]  # roots of the prunable classes
    frozen: int  # channels of the widest layer that cannot go
    reasons: list[str]

    @property
    def channels(self) -> int:
        return max(s.count for s in self.sources)

    def names(self) -> list[str]:
        return [s.node.name for s in self.sources]

    def removable(self, rate: float, round_to: int) -> int:
        """How many classes ``rate`` removes: the kept count rounded up to ``round_to``, at
        least one channel (or ``round_to``) kept, frozen ones always kept."""
        keep = -(-round(self.channels * (1 - rate)) // round_to) * round_to
        keep = min(self.channels, max(keep, round_to, 1))
        return max(0, min(len(self.classes), self.channels - keep))


class ChannelPruning(ir.passes.InPlacePass):
    """Remove channel groups by importance, then re-fit the layers that read them.

    Record: ``groups`` (layers, channels, removed, frozen), ``frozen_groups`` (layers and
    why), ``rate`` used, ``macs`` before/after, and per re-fitted layer the relative output
    error on calibration data before and after its re-fit.
    """

    name = "channel-pruning"

    def __init__(self, options: ChannelPruningOptions, batches: Sequence[Sample] = (), step: str = "prune"):
        self.options = options
        self.batches = list(batches)
        self.step = step

    def call(self, model: ir.Model) -> PassOutcome:
        graph = ChannelGraph(model.graph)
        groups = channel_groups(graph)
        chosen = {id(n) for n in select_layers([s.node for s in graph.sources], self.options.selection, self.step)}
        prunable = [g for g in groups if g.classes and all(id(s.node) in chosen for s in g.sources)]
        details = {"frozen_groups": [{"layers": g.names(), "reasons": g.reasons} for g in groups if not g.classes]}
        if not prunable:
            message = "no channel group can be pruned (all are frozen or excluded); the model is unchanged"
            warnings.warn(f"Step '{self.step}': {message}.", EdgecWarning, stacklevel=2)
            return PassOutcome(model, False, {**details, "message": message})
        scores = _scores(graph, prunable, self.options.importance, model, self.batches)
        ranked = [_ranked(g, scores) for g in prunable]
        macs = _MacCount(graph)
        if self.options.mac_reduction is not None:
            counts, rate = _counts_for_macs(graph, prunable, ranked, scores, macs, self.options)
        else:
            rate = self.options.rate or 0.0
            counts = _counts(prunable, scores, rate, self.options)
            if self.options.rates:
                counts = [g.removable(r, self.options.round_to) for g, r in zip(prunable, self._group_rates(graph, prunable))]
        removed = _removal(graph, ranked, scores, counts)
        macs_before, macs_after = macs(set()), macs(removed)
        original = model.clone() if self.options.reconstruct and removed else None
        kept_outputs = {node: graph.keep(node.outputs[0], removed) for node in model.graph if _refittable(node)}
        graph.apply(removed)
        refits = _reconstruct(original, model, kept_outputs, self.batches) if original is not None else []
        removed_per_group = [sum(c in removed for c in g.classes) for g in prunable]
        return PassOutcome(model, bool(removed), {
            "importance": self.options.importance,
            "scope": self.options.scope,
            "rate": round(rate, 4),
            "macs": {"before": macs_before, "after": macs_after},
            "groups": [
                {"layers": g.names(), "channels": g.channels, "removed": n, "frozen": g.frozen}
                for g, n in zip(prunable, removed_per_group)
            ],
            **details,
            "reconstruction": refits,
        })


    def _group_rates(self, graph: ChannelGraph, groups: list[Group]) -> list[float]:
        """Each group's rate: that of the first ``rates`` pattern naming one of its layers."""
        sources = [s.node for s in graph.sources]
        for pattern in self.options.rates:  # a pattern naming no layer is a typo: an error
            select_layers(sources, LayerSelection(include=[pattern]), self.step)
        chosen = []
        for group in groups:
            matching = (r for p, r in self.options.rates.items() if any(fnmatch.fnmatchcase(n, p) for n in group.names()))
            chosen.append(next(matching, self.options.rate or 0.0))
        return chosen


def channel_groups(graph: ChannelGraph) -> list[Group]:
    """Sources joined through shared classes, with each group's prunable classes."""
    parent = list(range(len(graph.sources)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_owner: dict[int, int] = {}
    for atom in range(1, len(graph.parent)):
        owner, root = graph.owner[atom], graph.find(atom)
        if owner < 0 or root == FIXED:
            continue
        other = first_owner.setdefault(root, owner)
        parent[find(owner)] = find(other)
    members: dict[int, list[int]] = {}
    for index in range(len(graph.sources)):
        members.setdefault(find(index), []).append(index)
    groups = []
    for indices in members.values():
        sources = [graph.sources[i] for i in indices]
        atoms = np.concatenate([s.atoms for s in sources])
        roots = sorted({graph.find(a) for a in atoms.tolist()} - {FIXED})
        widest = max(sources, key=lambda s: s.count)
        frozen = sum(graph.frozen(a) for a in widest.atoms.tolist())
        groups.append(Group(sources, roots, frozen, graph.frozen_reasons(atoms.tolist())))
    return groups


def _out_axis(node: ir.Node) -> int:
    """The output-channel axis of a layer's weight."""
    if node.op_type == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1 if node.op_type in ("ConvTranspose", "MatMul") else 0


def _scores(graph: ChannelGraph, groups: list[Group], importance: str, model: ir.Model, batches: list[Sample]) -> dict[int, float]:
    """Importance per class root: its atoms' scores summed over the coupled producers."""
    sources = [s for g in groups for s in g.sources]
    per_atom: dict[int, float] = {}
    if importance == "activation":
        arrays = capture(model, [s.node.outputs[0] for s in sources], batches)
    for source in sources:
        if importance == "activation":
            data = np.abs(arrays[source.node.outputs[0].name].astype(np.float64))
            axis = graph.dims[source.node.outputs[0]].axis
            values = data.mean(axis=tuple(a for a in range(data.ndim) if a != axis))
        else:
            weight = np.moveaxis(constant(source.node.inputs[1]).astype(np.float64), _out_axis(source.node), 0)
            flat = weight.reshape(weight.shape[0], -1)
            values = np.abs(flat).sum(axis=1) if importance == "l1" else np.sqrt((flat ** 2).sum(axis=1))  # l2, gates
        per_atom.update(zip(source.atoms.tolist(), values.tolist()))
    scores: dict[int, float] = {}
    for atom, value in per_atom.items():
        root = graph.find(atom)
        scores[root] = scores.get(root, 0.0) + value
    return scores


def _counts(groups: list[Group], scores: dict[int, float], rate: float, options: ChannelPruningOptions) -> list[int]:
    """How many classes each group loses at ``rate``."""
    counts = [g.removable(rate, options.round_to) for g in groups]
    if options.scope == "global":
        counts = _global_counts(groups, scores, rate, counts, options.round_to)
    return counts


def _ranked(group: Group, scores: dict[int, float]) -> list[int]:
    return sorted(group.classes, key=lambda c: (scores[c], c))


def _removal(graph: ChannelGraph, ranked: list[list[int]], scores: dict[int, float], counts: list[int]) -> set[int]:
    """The class roots to remove: each group's ``count`` least important (``ranked``: each
    group's classes, least important first)."""
    removed = {c for order, count in zip(ranked, counts) for c in order[:count]}
    return graph.spare_emptied(removed, lambda c: (scores.get(c, 0.0), c))


def _global_counts(groups: list[Group], scores: dict[int, float], rate: float, limits: list[int], round_to: int) -> list[int]:
    """Per group, how many of the model's ``rate`` least important channels (scores divided
    by the group's mean) fall in it; capped so every group keeps what ``removable`` keeps
    at rate → 1, and rounded so kept counts stay multiples of ``round_to``."""
    ranked = []
    for index, group in enumerate(groups):
        mean = np.mean([scores[c] for c in group.classes]) or 1.0
        ranked += [(scores[c] / mean, index) for c in group.classes]
    ranked.sort()
    total = sum(len(g.classes) for g in groups)
    counts = [0] * len(groups)
    for _, index in ranked[: round(rate * total)]:
        counts[index] += 1
    result = []
    for group, count in zip(groups, counts):
        cap = group.removable(0.999999, round_to)
        count = min(count, cap)
        keep = -(-(group.channels - count) // round_to) * round_to
        result.append(max(0, min(cap, group.channels - keep)))
    return result


def _counts_for_macs(graph: ChannelGraph, groups: list[Group], ranked: list[list[int]], scores: dict[int, float],
                     macs: _MacCount, options: ChannelPruningOptions) -> tuple[list[int], float]:
    """Counts that remove at least ``mac_reduction`` of the MACs, and the rate they start from.

    The largest rate short of the target is found by bisection on exact MAC counts; then,
    since ``round_to`` makes a rate step move every group by a whole block at once, blocks
    are added one group at a time, until the target is met: the least important block
    (relative to its group) among those that reach it, else the one losing the least
    importance per MAC saved. Without that step, 30% asked for
    gave up to 60% on small nets.
    """
    total = macs(set())

    def reduction(counts: list[int]) -> float:
        return 1 - macs(_removal(graph, ranked, scores, counts)) / total

    caps = _counts(groups, scores, 0.999999, options)
    if reduction(caps) < options.mac_reduction:
        raise RecipeError(
            f"Pruning can remove at most {reduction(caps):.1%} of the MACs here, not {options.mac_reduction:.0%}: "
            "the other layers are frozen or excluded.",
            hint="Lower mac_reduction or round_to, or see the frozen groups with `edgec analyze --sensitivity`.",
        )
    low, high = 0.0, 0.999999
    for _ in range(16):
        middle = (low + high) / 2
        low, high = (low, middle) if reduction(_counts(groups, scores, middle, options)) >= options.mac_reduction else (middle, high)
    counts = _counts(groups, scores, low, options)
    while (now := reduction(counts)) < options.mac_reduction:
        options_ = [(cost, reduction(after), after) for cost, after in _next_blocks(groups, ranked, scores, counts, caps, options.round_to)]
        enough = [o for o in options_ if o[1] >= options.mac_reduction]
        counts = min(enough, key=lambda o: (o[1], o[0]))[2] if enough else min(options_, key=lambda o: o[0] / max(o[1] - now, 1e-12))[2]
    return counts, low


def _next_blocks(groups: list[Group], ranked: list[list[int]], scores: dict[int, float], counts: list[int],
                 caps: list[int], round_to: int):
    """Per group that can lose one more ``round_to`` block: (the block's importance relative
    to its group's mean channel, the counts after removing it)."""
    for index, (group, order, count, cap) in enumerate(zip(groups, ranked, counts, caps)):
        kept = group.channels - count
        after = min(cap, group.channels - max((kept - 1) // round_to * round_to, 0))
        if after > count:
            mean = np.mean([scores[c] for c in order]) or 1.0
            yield float(np.sum([scores[c] for c in order[count:after]]) / mean), [*counts[:index], after, *counts[index + 1:]]


class _MacCount:
    """The model's MACs with some classes removed: each layer's count scales with the fraction
    of its input and output channels kept (only output channels for depthwise convs).

    The tensors that scale each layer are looked up once: the search for removal counts asks
    hundreds of times (DenseNet-121: 860)."""

    def __init__(self, graph: ChannelGraph):
        self.graph = graph
        macs, scaling, factors = [], [], []  # per layer: where its two factors are in ``scaling``, -1: none
        for node in graph.graph:
            counter = MAC_COUNTERS.get(node.op_type)
            count = counter(node) if counter is not None else None
            if count is None:
                continue
            by_input = attr(node, "group", 1) == 1
            factors.append([])
            for value in (node.outputs[0], node.inputs[0] if by_input else None):
                channels = graph.dims[value].atoms if value in graph.dims else ()
                factors[-1].append(len(scaling) if len(channels) else -1)
                scaling += [value] if len(channels) else []
            macs.append(count)
        self.macs = np.array(macs, dtype=np.float64)
        self.factors = np.array(factors, dtype=np.int64).reshape(-1, 2)
        self.sizes = np.array([len(graph.dims[v].atoms) for v in scaling], dtype=np.float64)
        self.roots, self.starts = graph.concatenated_roots(scaling)

    def __call__(self, removed: set[int]) -> int:
        kept = self.graph.kept_counts(self.roots, self.starts, removed) if len(self.sizes) else np.zeros(0)
        fractions = np.append(kept / self.sizes, 1.0)  # index -1: a side that does not scale
        return int(np.rint(self.macs * (fractions[self.factors[:, 0]] * fractions[self.factors[:, 1]])).astype(np.int64).sum())


def _refittable(node: ir.Node) -> bool:
    """A layer :func:`edgec.refit.patches` can express, with a constant weight."""
    if node.op_type == "Gemm":
        plain = not attr(node, "transA", 0) and attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0
    else:
        plain = node.op_type == "MatMul" or (node.op_type == "Conv" and attr(node, "group", 1) == 1)
    return plain and constant(node.inputs[1]) is not None and constant(node.inputs[1]).ndim in (2, 4)


def _reconstruct(original: ir.Model, pruned: ir.Model, kept_outputs: dict[ir.Node, np.ndarray | None],
                 batches: list[Sample]) -> list[dict]:
    """Re-fit, in graph order, each Conv/Gemm/MatMul whose input lost channels."""
    pairs = [(old, new) for old, new in zip(original.graph, pruned.graph) if new in kept_outputs and _lost_inputs(old, new)]
    if not pairs:
        return []
    targets = capture(original, [old.outputs[0] for old, _ in pairs], batches)
    walk = Walk(pruned, batches, [new for _, new in pairs])
    return [_refit(new, walk.input_of(new), targets[old.outputs[0].name], kept_outputs[new], pruned) for old, new in pairs]


def _lost_inputs(old: ir.Node, new: ir.Node) -> bool:
    axis = 1 if new.op_type == "Conv" else (1 if new.op_type == "Gemm" and attr(new, "transB", 0) else 0)
    return constant(old.inputs[1]).shape[axis] != constant(new.inputs[1]).shape[axis]


def _refit(node: ir.Node, x: np.ndarray, target: np.ndarray, kept: np.ndarray | None, model: ir.Model) -> dict:
    """Least-squares re-fit of ``node`` (in ``model``, reading ``x``) toward the original
    layer's outputs ``target``, restricted to the output channels ``kept``."""
    rows, wanted = patches(node, x), output_rows(node, target)
    if kept is not None:
        wanted = wanted[:, kept]
    if len(rows) > MAX_FIT_ROWS:
        pick = np.sort(np.random.default_rng(0).choice(len(rows), MAX_FIT_ROWS, replace=False))
        rows, wanted = rows[pick], wanted[pick]
    weight = constant(node.inputs[1])
    current = _as_matrix(node, weight).astype(np.float64)
    with_bias = node.op_type != "MatMul"
    if with_bias:  # the bias is one more weight column, fed by a column of ones
        rows = np.hstack([rows, np.ones((len(rows), 1), rows.dtype)])
        current = np.hstack([current, _bias(node, current.shape[0])[:, None]])
    residual = wanted - rows @ current.T
    before = _relative(residual, wanted)
    fitted = current + least_squares(rows, residual, ridge=RIDGE).T
    after = _relative(wanted - rows @ fitted.T, wanted)
    record = {"layer": node.name, "error_before": round(before, 6), "error_after": round(min(before, after), 6)}
    if after >= before:
        return {**record, "kept_pruned_weights": True}
    matrix = fitted[:, :-1] if with_bias else fitted
    replace_initializer_data(node.inputs[1], _from_matrix(node, matrix, weight.shape).astype(weight.dtype))
    if with_bias:
        set_bias(model.graph, node, 2, fitted[:, -1].astype(weight.dtype))
    return record


def _as_matrix(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as ``[out, features]`` in :func:`patches`' feature order."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1)
    return weight if node.op_type == "Gemm" and attr(node, "transB", 0) else weight.T


def _from_matrix(node: ir.Node, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if node.op_type == "Conv":
        return matrix.reshape(shape)
    return matrix if node.op_type == "Gemm" and attr(node, "transB", 0) else matrix.T


def _bias(node: ir.Node, outputs: int) -> np.ndarray:
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return np.zeros(outputs) if bias is None else np.broadcast_to(bias.astype(np.float64).reshape(-1), (outputs,)).copy()


def _relative(residual: np.ndarray, wanted: np.ndarray) -> float:
    return float(np.linalg.norm(residual) / max(np.linalg.norm(wanted), 1e-12))
