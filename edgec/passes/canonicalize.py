"""Canonicalization: put any exporter's graph into the one form later passes expect.

After :func:`canonicalize_passes` every input has a static shape (a symbolic batch is 1),
every value carries the shape and type the graph computes (stale declared shapes replaced),
constant subgraphs (including ``Shape``-derived arithmetic) are folded into initializers by
onnxsim on ONNX Runtime's kernels (or, where onnxsim fails, by onnx's reference evaluator),
BatchNormalization that follows a Conv/ConvTranspose/Gemm is folded into its weights, and
Identity/Dropout and dead nodes are gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_common
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from edgec.errors import DynamicShapeError, ModelCheckError
from edgec.graph import attr, constant, replace_initializer_data, set_bias, sole_consumer, static_shape, take_name
from edgec.model import to_proto
from edgec.passes import simplifier
from edgec.passes.pipeline import PassOutcome

InputShapes = Mapping[str, Sequence[int]]

# Larger constant subgraphs are left alone: folding them would bloat the file.
FOLD_OUTPUT_LIMIT = 1 << 22  # elements


class FixInputShapes(ir.passes.InPlacePass):
    """Pin dynamic input dimensions to the sizes the user gave (``--input-shape``)."""

    name = "fix-input-shapes"

    def __init__(self, shapes: InputShapes) -> None:
        self.shapes = {name: tuple(int(d) for d in dims) for name, dims in shapes.items()}

    def call(self, model: ir.Model) -> PassOutcome:
        inputs = {v.name: v for v in model.graph.inputs}
        shapes = self._resolve_names(inputs)
        sizes: dict[str, int] = {}
        for name, dims in shapes.items():
            sizes.update(_symbol_sizes(inputs[name].shape, dims))
            _pin_shape(inputs[name], dims)
        _bind_symbols([v for v in model.graph.inputs if v.name not in shapes], sizes)
        return PassOutcome(model, bool(shapes), {"shapes": {k: list(v) for k, v in shapes.items()}})

    def _resolve_names(self, inputs: Mapping[str, ir.Value]) -> dict[str, tuple[int, ...]]:
        """A single unnamed shape (key "") applies to a model's only input."""
        shapes = dict(self.shapes)
        if "" in shapes:
            if len(inputs) != 1:
                raise DynamicShapeError(
                    f"--input-shape without a name is ambiguous: the model has inputs {sorted(inputs)}.",
                    hint="Write it as NAME=1x3x224x224.",
                )
            shapes[next(iter(inputs))] = shapes.pop("")
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise DynamicShapeError(
                f"--input-shape names {unknown}, but the model's inputs are {sorted(inputs)}.",
                hint="Use one of the model's input names.",
            )
        return shapes


def _pin_shape(value: ir.Value, dims: tuple[int, ...]) -> None:
    current = value.shape
    if current is not None and current.rank() != len(dims):
        raise DynamicShapeError(
            f"Input '{value.name}' has rank {current.rank()} ({_fmt(current)}), "
            f"but --input-shape gives {len(dims)} dims ({'x'.join(map(str, dims))}).",
            hint="Give one size per dimension.",
        )
    if any(d <= 0 for d in dims):
        raise DynamicShapeError(f"--input-shape for '{value.name}' has a non-positive size: {dims}.")
    for i, d in enumerate(dims):
        fixed = current[i] if current is not None else None
        if not _is_dynamic(fixed) and fixed != d:
            raise DynamicShapeError(
                f"Input '{value.name}' has static size {fixed} in dim {i}, but --input-shape gives {d}.",
                hint=f"The model's shape is {_fmt(current)}; only symbolic dims can be set.",
            )
    value.shape = ir.Shape(dims)


def _symbol_sizes(shape: ir.Shape | None, dims: Sequence[int]) -> dict[str, int]:
    """The sizes ``dims`` give the named symbolic dimensions of ``shape``."""
    if shape is None:
        return {}
    return {d.value: size for d, size in zip(shape.dims, dims) if isinstance(d, ir.SymbolicDim) and d.value}


def _bind_symbols(values: Sequence[ir.Value], sizes: Mapping[str, int]) -> None:
    """A named dimension means one size wherever it appears ([batch, seq] and [2, batch, 128])."""
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value in sizes for d in value.shape.dims):
            value.shape = ir.Shape([sizes.get(d.value, d) if isinstance(d, ir.SymbolicDim) else d for d in value.shape.dims])


def _is_dynamic(dim: int | ir.SymbolicDim | None) -> bool:
    """Symbolic, unknown, or the -1 some exporters write for "any size"."""
    return not isinstance(dim, int) or dim < 0


def _dim_text(dim: int | ir.SymbolicDim) -> str:
    return str(dim) if isinstance(dim, int) else (dim.value or "?")


def _fmt(shape: ir.Shape | None) -> str:
    if shape is None:
        return "unknown"
    return "x".join(_dim_text(d) for d in shape.dims)


class DefaultBatchSize(ir.passes.InPlacePass):
    """Build for batch 1 where an input's first dimension is symbolic, as the field's converters do.

    A symbolic first dimension (``N``, ``batch``, tf2onnx's ``unk__123``, -1) is the batch in
    almost every exported model, and edge deployments run one sample at a time. Runs after
    :class:`FixInputShapes`, so a size the user pinned wins; other symbolic dimensions (image
    size, sequence length) have no safe default and stay an error in :class:`RequireStaticInputs`.
    """

    name = "default-batch"

    def call(self, model: ir.Model) -> PassOutcome:
        dynamic = [v for v in model.graph.inputs if v.shape is not None and v.shape.rank() > 0 and _is_dynamic(v.shape[0])]
        if not dynamic:
            return PassOutcome(model, False)
        defaulted = {v.name: _dim_text(v.shape[0]) for v in dynamic}
        sizes = {name: 1 for v in dynamic for name in _symbol_sizes(v.shape, [1])}
        for value in dynamic:
            value.shape = ir.Shape([1, *value.shape.dims[1:]])
        _bind_symbols(model.graph.inputs, sizes)
        first = next(v for v in model.graph.inputs if v.name in defaulted)
        listed = ", ".join(f"'{name}' ({dim})" for name, dim in defaulted.items())
        note = (f"Built for batch size 1: the first dimension of input(s) {listed} is symbolic. Pin another "
                f"size with --input-shape {first.name}=N{_fmt(first.shape)[1:]}.")
        return PassOutcome(model, True, {"inputs": defaulted, "note": note})


class RequireStaticInputs(ir.passes.InPlacePass):
    """Fail early, naming every dynamic dimension of every input, instead of deep inside a backend."""

    name = "require-static-inputs"

    def call(self, model: ir.Model) -> PassOutcome:
        dynamic = [v for v in model.graph.inputs if v.shape is None or any(_is_dynamic(d) for d in v.shape.dims)]
        if dynamic:
            listed = "; ".join(_describe_dynamic(v) for v in dynamic)
            example = " ".join(f"--input-shape {v.name}={_pin_example(v.shape)}" for v in dynamic)
            raise DynamicShapeError(
                f"The model has inputs with dynamic dimensions: {listed}.",
                hint=f"Pin them with {example}, giving one size per dimension (e.g. 1x3x224x224).",
            )
        return PassOutcome(model, False)


def _describe_dynamic(value: ir.Value) -> str:
    if value.shape is None:
        return f"'{value.name}' has no declared shape (not even its rank)"
    dims = [f"{i} ({_dim_text(d)})" for i, d in enumerate(value.shape.dims) if _is_dynamic(d)]
    return f"'{value.name}' ({_fmt(value.shape)}) in dim{'s' if len(dims) > 1 else ''} {', '.join(dims)}"


def _pin_example(shape: ir.Shape | None) -> str:
    """The input's shape with a placeholder where a size is missing: ``1x3xSIZExSIZE`` from ``1x3x?x?``."""
    if shape is None:
        return "1x..."
    return "x".join("SIZE" if _is_dynamic(d) else str(d) for d in shape.dims)


class UniqueNames(ir.passes.InPlacePass):
    """Give each value, in subgraphs too, a name no other value of the model has, and each
    node a non-empty name no other node has.

    An ``If``'s two branches may reuse each other's names (each is its own scope; onnxsim's
    output of a Silero VAD does), but onnx's shape inference keeps the values it propagates in
    one table for the whole model and fails on the second ("Data for input 0 already exists").
    The main graph's inputs, outputs and initializers keep their names. Nodes may come unnamed
    (hand-written graphs, nodes onnxsim creates for torch.onnx's dynamo exports), while passes
    name what they add after the node they replace and errors name the node: an unnamed node
    takes its first output's name. Named nodes keep theirs, so ``--keep-float`` still finds them.
    """

    name = "unique-names"

    def call(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        named = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
        used, seen = {v.name for v in named}, set(named)
        renamed = []

        def settle(values) -> None:
            for value in values:
                if value in seen or value.name is None:
                    continue
                seen.add(value)
                if value.name in used:
                    renamed.append(value.name)
                    value.name = _unused_name(value.name, used)
                used.add(value.name)

        def enter(subgraph: ir.Graph) -> None:
            settle([*subgraph.inputs, *subgraph.initializers.values()])

        nodes = list(ir.traversal.RecursiveGraphIterator(graph, enter_graph=enter))
        for node in nodes:
            settle(node.outputs)
        named_nodes = _name_nodes(nodes)
        return PassOutcome(model, bool(renamed or named_nodes), {"renamed": len(renamed), "nodes_named": len(named_nodes)})


def _name_nodes(nodes: Sequence[ir.Node]) -> list[str]:
    """Unnamed or repeated node names made unique; the new names."""
    used = {n.name for n in nodes if n.name}
    taken: set[str] = set()
    named = []
    for node in nodes:
        if node.name and node.name not in taken:
            taken.add(node.name)
            continue
        base = node.name or next((v.name for v in node.outputs if v.name), node.op_type)
        node.name = base if base not in used else _unused_name(base, used)
        used.add(node.name)
        taken.add(node.name)
        named.append(node.name)
    return named


def _unused_name(name: str, used: set[str]) -> str:
    k = 1
    while f"{name}__{k}" in used:
        k += 1
    return f"{name}__{k}"


class InferShapes(ir.passes.FunctionalPass):
    """ONNX shape inference in strict mode, trusting what the graph computes over what it declares.

    Exporters get declared shapes wrong (a PyTorch 1.9 CRNN declares its output ``1x?`` and
    computes ``32x1x8210``), and pinning an input to a new size makes every shape recorded at
    export time stale. So the declared shapes of outputs and intermediate values are dropped
    before inference; a declared shape survives only where inference finds none. Those that
    contradicted the inferred ones are listed (with a note). A model inference still rejects,
    nodes whose inputs cannot fit each other, is reported, not ignored.
    """

    name = "infer-shapes"

    def call(self, model: ir.Model) -> PassOutcome:
        declared = {v.name: v.shape for v in _computed_values(model.graph) if v.shape is not None}
        proto = to_proto(model)
        for info in [*proto.graph.value_info, *proto.graph.output]:
            if info.name in declared and info.type.HasField("tensor_type"):
                info.type.tensor_type.ClearField("shape")
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
            raise ModelCheckError(
                f"Shape inference failed: {str(exc).strip().splitlines()[0]}",
                hint="The named node has inputs of incompatible shapes or types; check the export "
                "or the sizes given with --input-shape.",
            ) from exc
        result = ir.serde.deserialize_model(inferred)
        stale = _settle_declared_shapes(result.graph, declared)
        unknown = sum(1 for n in result.graph for o in n.outputs if o.shape is None)
        details: dict[str, Any] = {"values_without_shape": unknown}
        if stale:
            details.update(_stale_record(result.graph, stale))
        return PassOutcome(result, True, details)


def _computed_values(graph: ir.Graph) -> list[ir.Value]:
    """Values nodes compute: their shapes follow from the inputs' (initializers' are data)."""
    return [v for v in (*(o for n in graph for o in n.outputs), *graph.outputs) if not v.is_graph_input() and not v.is_initializer()]


def _settle_declared_shapes(graph: ir.Graph, declared: Mapping[str, ir.Shape]) -> dict[str, tuple[str, str]]:
    """Put back declared shapes inference found nothing for; return the contradicted ones
    as {name: (declared, inferred)}."""
    stale = {}
    for value in _computed_values(graph):
        old = declared.get(value.name)
        if old is None:
            continue
        if value.shape is None:
            value.shape = old
        elif _contradicts(old, value.shape):
            stale[value.name] = (_fmt(old), _fmt(value.shape))
    return stale


def _contradicts(declared: ir.Shape, inferred: ir.Shape) -> bool:
    if declared.rank() != inferred.rank():
        return True
    return any(not _is_dynamic(a) and not _is_dynamic(b) and a != b for a, b in zip(declared.dims, inferred.dims))


def _stale_record(graph: ir.Graph, stale: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    outputs = {v.name: {"declared": stale[v.name][0], "inferred": stale[v.name][1]} for v in graph.outputs if v.name in stale}
    intermediates = len(stale) - len(outputs)
    said = [f"output '{name}' is declared {s['declared']} but computes {s['inferred']}" for name, s in outputs.items()]
    said += [f"{intermediates} intermediate value(s) had stale declared shapes"] if intermediates else []
    note = f"Declared shapes replaced by what the graph computes: {'; '.join(said)}."
    return {"stale_outputs": outputs, "stale_intermediates": intermediates, "note": note}


class FoldConstants(ir.passes.InPlacePass):
    """Evaluate every node whose inputs are known at compile time (``Shape`` of static
    tensors included) and store the result as an initializer."""

    name = "fold-constants"

    def call(self, model: ir.Model) -> PassOutcome:
        before = model.graph.num_nodes()
        folder = FoldConstantsPass(
            shape_inference=True, input_size_limit=FOLD_OUTPUT_LIMIT, output_size_limit=FOLD_OUTPUT_LIMIT
        )
        modified = folder(model).modified
        lifted = ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        ir_common.RemoveUnusedNodesPass()(model)
        folded = before - model.graph.num_nodes()
        return PassOutcome(model, modified or lifted.modified, {"nodes_removed": folded})


class Simplify(ir.passes.FunctionalPass):
    """Fold constants and shape arithmetic with onnxsim, which computes them with ONNX Runtime's
    kernels and runs onnx-optimizer's rewrites (identities, transposes, pads into convs, ...).

    onnx's reference evaluator, which the fallback folder uses, cannot run every node a real
    export has (a ``ConstantOfShape`` value it cannot read stopped a PyTorch ViT). BatchNorm is
    left to :class:`FoldBatchNorm` (onnx-optimizer's own fusion fails on some graphs). When
    onnxsim fails (it also does when ONNX Runtime cannot run one of the constant nodes: it
    moves that node after its consumers and then rejects the unsorted graph),
    :class:`FoldConstants` folds instead and the record (and a note) says why.
    """

    name = "simplify"

    def call(self, model: ir.Model) -> PassOutcome:
        proto = to_proto(model)
        try:
            simplified = simplifier.simplify(proto, tensor_size_threshold=f"{FOLD_OUTPUT_LIMIT * 4}B")  # float32 elements
        except simplifier.SimplifierFailed as exc:
            return _fold_instead(ir.serde.deserialize_model(proto), str(exc))
        return PassOutcome(ir.serde.deserialize_model(simplified), True, {"simplifier": f"onnxsim {simplifier.VERSION}"})


def _fold_instead(model: ir.Model, failure: str) -> PassOutcome:
    said = " ".join(failure.split())  # onnx's messages run over several lines
    reason = said if len(said) <= 160 else said[:157] + "..."
    folded = FoldConstants()(model)
    note = (f"onnxsim could not simplify the model ({reason}); edgec folded its constants with onnx's "
            "reference evaluator instead.")
    return PassOutcome(folded.model, True, {"fallback": reason, **folded.details, "note": note})


class FoldBatchNorm(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

    ``y = (x*W + b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` becomes
    ``x*(W*s) + ((b - mean)*s + beta)``: exact up to float rounding.
    """

    name = "fold-batchnorm"

    def call(self, model: ir.Model) -> PassOutcome:
        folded = [bn.name for bn in list(model.graph) if bn.op_type == "BatchNormalization" and _fold_bn(model.graph, bn)]
        return PassOutcome(model, bool(folded), {"folded": folded})


def _fold_bn(graph: ir.Graph, bn: ir.Node) -> bool:
    producer = bn.inputs[0].producer()
    params = [constant(v) for v in bn.inputs[1:5]]
    if (
        producer is None
        or producer.op_type not in _BN_FOLDERS
        or sole_consumer(bn.inputs[0]) is not bn
        or any(p is None for p in params)
        or len(bn.outputs) != 1
        or attr(bn, "training_mode", 0)
        or not _weights_foldable(producer)
    ):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + attr(bn, "epsilon", 1e-5))
    if not _BN_FOLDERS[producer.op_type](graph, producer, scale, beta - mean * scale):
        return False
    was_output = bn.outputs[0].is_graph_output()
    bn.outputs[0].replace_all_uses_with(producer.outputs[0], replace_graph_outputs=True)
    if was_output:  # the user-visible output keeps its name
        take_name(producer.outputs[0], bn.outputs[0], graph)
    graph.remove(bn, safe=True)
    return True


def _weights_foldable(node: ir.Node) -> bool:
    weight = node.inputs[1]
    # A weight shared with another node cannot be rescaled for this one alone.
    return constant(weight) is not None and len(weight.uses()) == 1 and not weight.is_graph_input()


def _fold_into_conv(graph: ir.Graph, conv: ir.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    weight = constant(conv.inputs[1])
    broadcast = scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    replace_initializer_data(conv.inputs[1], (weight * broadcast).astype(weight.dtype))
    _fold_bias(graph, conv, 2, scale, shift, weight.dtype)
    return True


def _fold_into_conv_transpose(graph: ir.Graph, conv: ir.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    weight = constant(conv.inputs[1])  # [Cin, Cout/group, k...]
    group = attr(conv, "group", 1)
    cin, cout_g = weight.shape[:2]
    grouped = weight.reshape((group, cin // group, cout_g) + weight.shape[2:])
    per_group_scale = scale.reshape((group, 1, cout_g) + (1,) * (weight.ndim - 2))
    replace_initializer_data(conv.inputs[1], (grouped * per_group_scale).reshape(weight.shape).astype(weight.dtype))
    _fold_bias(graph, conv, 2, scale, shift, weight.dtype)
    return True


def _fold_into_gemm(graph: ir.Graph, gemm: ir.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    weight = constant(gemm.inputs[1])
    if attr(gemm, "transA", 0) or weight.ndim != 2:
        return False
    # alpha scales A*B only, so the rescaled weight carries the BN scale for it too.
    beta = attr(gemm, "beta", 1.0)
    trans_b = attr(gemm, "transB", 0)
    scaled = weight * (scale[:, None] if trans_b else scale[None, :])
    replace_initializer_data(gemm.inputs[1], scaled.astype(weight.dtype))
    bias = constant(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
    if len(gemm.inputs) > 2 and bias is None:
        return False
    new_bias = (0.0 if bias is None else beta * bias.astype(np.float64)) * scale + shift
    set_bias(graph, gemm, 2, new_bias.astype(weight.dtype))
    gemm.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return True


def _fold_bias(graph, node, index, scale, shift, dtype) -> None:
    bias = constant(node.inputs[index]) if len(node.inputs) > index else None
    new_bias = (0.0 if bias is None else bias.astype(np.float64)) * scale + shift
    set_bias(graph, node, index, new_bias.astype(dtype))


_BN_FOLDERS = {"Conv": _fold_into_conv, "ConvTranspose": _fold_into_conv_transpose, "Gemm": _fold_into_gemm}


# Ops that broadcast all their inputs against each other (numpy rules).
_BROADCASTING = frozenset("Add Sub Mul Div Pow Max Min Sum Mean Mod Where Equal Less Greater LessOrEqual "
                          "GreaterOrEqual And Or Xor BitShift".split())


class DropBroadcastExpand(ir.passes.InPlacePass):
    """``a * Expand(g, shape(a))`` → ``a * g``: the op broadcasts the gate anyway.

    PyTorch's ``x * gate.expand_as(x)`` (ECA, SK and split-attention gates) exports an Expand
    that writes the [N,C,1,1] gate out at full size, hides its shape from the layout pass (a
    TRANSPOSE pair around every gate) and is an op channel pruning has no rule for."""

    name = "drop-broadcast-expand"

    def call(self, model: ir.Model) -> PassOutcome:
        dropped = [n.name for n in list(model.graph) if n.op_type == "Expand" and _drop_expand(n)]
        return PassOutcome(model, bool(dropped), {"dropped": dropped})


def _drop_expand(expand: ir.Node) -> bool:
    expanded, source = expand.outputs[0], expand.inputs[0]
    uses = list(expanded.uses())
    if not uses or expanded.is_graph_output() or not all(_broadcasts_anyway(user, expanded, source) for user, _ in uses):
        return False
    for user, index in uses:
        user.replace_input_with(index, source)
    return True


def _broadcasts_anyway(user: ir.Node, expanded: ir.Value, source: ir.Value) -> bool:
    """``user`` gives the same result with ``source`` in place of its expansion."""
    if user.op_type not in _BROADCASTING or user.domain not in ("", "ai.onnx"):
        return False
    before = [static_shape(v) if v is not None else None for v in user.inputs]
    after = [static_shape(source) if v is expanded else shape for v, shape in zip(user.inputs, before)]
    if None in before or None in after:
        return False
    try:
        return np.broadcast_shapes(*after) == np.broadcast_shapes(*before)
    except ValueError:
        return False


class IdentityElimination(ir_common.IdentityEliminationPass):
    """onnx-ir's identity elimination, keeping the Identity nodes it would break the graph
    removing: one that returns, as a graph output, a value defined in another graph (an
    ``If`` branch passing an outer value through, as PyTorch-exported RNN loops do) or a
    value that is already a graph output (two outputs would share one name)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source, result = (node.inputs[0] if node.inputs else None), (node.outputs[0] if node.outputs else None)
        if (source is not None and result is not None and result.is_graph_output()
                and (source.graph is not node.graph or source.is_graph_output())):
            return False
        return super()._try_eliminate_identity_node(node)


def cleanup_passes() -> list[ir.passes.PassBase]:
    """Dead code, identities and ordering: run after any pass that rewires the graph."""
    return [
        IdentityElimination(),
        ir_common.RemoveUnusedNodesPass(),
        ir_common.RemoveUnusedOpsetsPass(),
        ir_common.TopologicalSortPass(),
    ]


def canonicalize_passes(input_shapes: InputShapes | None = None) -> list[ir.passes.PassBase]:
    """The passes every build starts with, in order."""
    return [
        FixInputShapes(input_shapes or {}),
        DefaultBatchSize(),
        RequireStaticInputs(),
        UniqueNames(),
        InferShapes(),
        Simplify(),
        UniqueNames(),
        FoldBatchNorm(),
        DropBroadcastExpand(),
        *cleanup_passes(),
        InferShapes(),
    ]
