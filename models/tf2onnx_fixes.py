"""Four things tf2onnx 1.17 needs to export the zoo's TensorFlow-side models as intended.

1. ``rewrite_keras_prelu``: tf_keras' ``PReLU`` layer computes ``relu(x) - alpha * relu(-x)``
   and tf2onnx exports that literally (Relu, Neg, Relu, Mul, Add); it has a PRelu handler
   only for TFLite's fused op. This custom rewriter turns the Keras pattern into one ONNX
   ``PRelu`` (what TFLite-origin graphs and other exporters produce).
2. ``KEEP_TRANSPOSES``: with all of tf2onnx's optimizers, a 1-channel NHWC input becomes a
   Reshape and every NHWC<->NCHW Transpose around the convs is pushed out of a GAP-headed
   graph, so no Transpose is left. Passing ``optimizers=KEEP_TRANSPOSES`` runs every default
   optimizer except the transpose optimizer: the Transposes tf2onnx puts around each conv
   stay, which is the layout problem edgec's channels-last pass has to solve.
   (Unrelated but easy to trip on: tf2onnx's ``rewrite_conv2d_with_pad`` merges a
   ZeroPadding2D into a following ``Conv2D``; only a Pad feeding a ``DepthwiseConv2D``
   survives as an ONNX ``Pad``.)
3. ``TFLITE_CUSTOM_OP_HANDLERS``: MediaPipe's selfie segmentation ends in the MediaPipe
   custom op ``Convolution2DTransposeBias`` (transpose conv + bias). tf2onnx leaves it as an
   unknown ``TFL_Convolution2DTransposeBias`` node that ONNX Runtime refuses to load; the
   handler rewrites it into NHWC->NCHW Transpose, ``ConvTranspose`` (weights OHWI -> IOHW,
   bias), NCHW->NHWC Transpose. Strides and padding come from the tensor shapes because
   tf2onnx cannot parse the op's custom options.
4. ``stable_names`` and ``STABLE`` / ``KEEP_TRANSPOSES``: tf2onnx's generated
   ``<base>__<n>`` names, its initializer order and which of two identical nodes its
   duplicate merge keeps all change from run to run (PYTHONHASHSEED does not help), so its
   output is not byte-reproducible. Passing these optimizer sets (their duplicate merge
   keeps a fixed survivor) and renumbering the generated names by first use makes it so.
   For TFLite input, which of the no-op Reshapes tf2onnx removes also varies;
   ``drop_noop_reshapes`` removes all of them (``convert_tflite`` does all of this).

Usage::

    proto, _ = tf2onnx.convert.from_keras(model, ..., custom_rewriter=[rewrite_keras_prelu],
                                          optimizers=KEEP_TRANSPOSES)
    proto = stable_names(proto)
    proto = convert_tflite(path, opset=17)  # = from_tflite + handlers + STABLE + stable_names
"""

from __future__ import annotations

import itertools
import os
import re
from typing import Any

import onnx
from tf2onnx import optimizer, utils
from tf2onnx.graph_matcher import GraphMatcher, OpTypePattern
from tf2onnx.optimizer.merge_duplicated_nodes_optimizer import MergeDuplicatedNodesOptimizer

_AUTO_SUFFIX = re.compile(r"__\d+$")  # tf2onnx's generated-name suffix, from a global counter


class _StableMergeDuplicates(MergeDuplicatedNodesOptimizer):
    """tf2onnx's duplicate-node merge, keeping the same survivor every run.

    The stock optimizer keeps whichever duplicate it meets first, and tf2onnx's node order
    at that point varies between runs, so the surviving node's name (e.g. which of two
    identical MaxPools or ReLU6 bound constants) changed from build to build.
    """

    @staticmethod
    def _group_nodes_by_type_inputs(graph: Any) -> dict:
        groups = MergeDuplicatedNodesOptimizer._group_nodes_by_type_inputs(graph)
        for nodes in groups.values():
            nodes.sort(key=lambda node: (_AUTO_SUFFIX.sub("", node.name), node.name))
        return groups


def stable_optimizers(keep_transposes: bool = False) -> dict[str, Any]:
    """tf2onnx's default optimizers with a deterministic duplicate merge.

    ``keep_transposes`` leaves out the transpose optimizer (see point 2 above).
    """
    chosen = {}
    for name, opt in optimizer._get_optimizers().items():
        if keep_transposes and name == "optimize_transpose":
            continue
        chosen[name] = _StableMergeDuplicates if name == "merge_duplication" else opt
    return chosen


KEEP_TRANSPOSES = stable_optimizers(keep_transposes=True)
STABLE = stable_optimizers()

_KERAS_PRELU = OpTypePattern("AddV2", name="add", inputs=[
    OpTypePattern("Relu", name="positive", inputs=["*"]),
    OpTypePattern("Mul", name="mul", inputs=[
        OpTypePattern("Const", name="negated_alpha"),
        OpTypePattern("Relu", inputs=[OpTypePattern("Neg", name="neg_x", inputs=["*"])]),
    ]),
])


def rewrite_keras_prelu(graph: Any, ops: list[Any]) -> list[Any]:
    """Replace Keras' Relu/Neg/Mul/Add PReLU expansion with one ONNX PRelu node.

    Runs as a tf2onnx custom rewriter on the TF-level graph, after constant folding has
    turned ``-alpha`` into a Const; the PRelu slope is that constant negated back.
    """
    for match in GraphMatcher(_KERAS_PRELU, allow_reorder=True).match_ops(ops):
        x = match.get_op("positive").input[0]
        if match.get_op("neg_x").input[0] != x:
            continue
        add = match.get_op("add")
        if add.output[0] in graph.outputs:  # graph outputs are names: leave those alone
            continue
        slope = -match.get_op("negated_alpha").get_tensor_value(as_list=False)
        alpha = graph.make_const(utils.make_name(f"{add.name}_alpha"), slope)
        prelu = graph.make_node(
            "PRelu", [x, alpha.output[0]], skip_conversion=True,
            shapes=[graph.get_shape(add.output[0])], dtypes=[graph.get_dtype(add.output[0])],
        )
        graph.replace_all_inputs(add.output[0], prelu.output[0], ops=ops)
        ops.append(prelu)
    return ops


def _conv_transpose_bias(ctx: Any, node: Any, name: str, args: list[Any]) -> Any:
    """MediaPipe ``Convolution2DTransposeBias`` (NHWC, OHWI weights) -> ONNX ConvTranspose."""
    x, weights, _bias = node.input
    in_shape = ctx.get_shape(x)  # N, H, W, C
    out_shape = ctx.get_shape(node.output[0])  # N, H', W', O
    kernel = ctx.get_shape(weights)[1:3]  # O, kH, kW, I
    strides = [out_shape[i] // in_shape[i] for i in (1, 2)]
    total = [(in_shape[i + 1] - 1) * strides[i] + kernel[i] - out_shape[i + 1] for i in (0, 1)]
    utils.make_sure(min(total) >= 0, "cannot infer padding of %s", node.name)
    node.type, node.domain = "ConvTranspose", ""
    for attr in list(node.attr):
        del node.attr[attr]
    node.set_attr("kernel_shape", kernel)
    node.set_attr("strides", strides)
    node.set_attr("pads", [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2])
    ctx.insert_new_node_on_input(node, "Transpose", x, input_index=0, perm=[0, 3, 1, 2])
    ctx.insert_new_node_on_input(node, "Transpose", weights, input_index=1, perm=[3, 0, 1, 2])
    nchw_out = node.output[0]
    back = ctx.insert_new_node_on_output("Transpose", nchw_out, perm=[0, 2, 3, 1])
    ctx.set_shape(back.output[0], out_shape)
    ctx.set_dtype(back.output[0], ctx.get_dtype(x))
    ctx.set_shape(nchw_out, [out_shape[0], out_shape[3], out_shape[1], out_shape[2]])
    return node


TFLITE_CUSTOM_OP_HANDLERS = {"TFL_Convolution2DTransposeBias": (_conv_transpose_bias, [])}


# tf2onnx names the tensors it creates ``<base>__<n>`` from a process-wide counter, and its
# optimizers visit nodes in an order that changes from run to run (even with a fixed
# PYTHONHASHSEED), so the same model comes out with different constant names and a different
# initializer order each time, while node order, op types and values stay the same.
_AUTO_NAME = re.compile(r"^(?P<stem>.+?__\d+)(?P<port>:\d+)?$")


def stable_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Renumber tf2onnx's ``__<n>`` names by first use and order initializers the same way.

    Makes tf2onnx output byte-identical across runs (so ``make_zoo.py --check`` can compare
    sha256) without touching any name a user would read, the graph structure or any value.
    """
    graph = model.graph
    utils.make_sure(
        not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for n in graph.node for a in n.attribute),
        "stable_names does not handle subgraphs",
    )
    stems: dict[str, str] = {}
    counter = itertools.count(1)

    def rename(name: str) -> str:
        match = _AUTO_NAME.match(name)
        if not match:
            return name
        stem = match["stem"]
        if stem not in stems:
            stems[stem] = f"{stem.rsplit('__', 1)[0]}__{next(counter)}"
        return stems[stem] + (match["port"] or "")

    for value in graph.input:
        value.name = rename(value.name)
    first_use: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        node.name = rename(node.name)
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        for name in node.input:
            first_use.setdefault(name, position)
    for value in list(graph.output) + list(graph.value_info):
        value.name = rename(value.name)
    for init in graph.initializer:
        init.name = rename(init.name)
    ordered = sorted(graph.initializer, key=lambda t: (first_use.get(t.name, len(graph.node)), t.name))
    graph.ClearField("initializer")
    graph.initializer.extend(ordered)
    infos = sorted(graph.value_info, key=lambda v: v.name)
    graph.ClearField("value_info")
    graph.value_info.extend(infos)
    return model


def drop_noop_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Reshapes whose static input shape already equals their target shape.

    tf2onnx removes some of these (e.g. after the GAP of a squeeze-excite block) and keeps
    others depending on the order its optimizers happen to visit nodes, so the same TFLite
    file converted twice can differ by a few of them. Removing all of them is exact and
    leaves one answer.
    """
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    for node in list(graph.node):
        if node.op_type != "Reshape" or node.output[0] in outputs:
            continue
        source, target = shapes.get(node.input[0]), constants.get(node.input[1])
        if not source or None in source or source != target:
            continue
        for consumer in graph.node:
            consumer.input[:] = [node.input[0] if name == node.output[0] else name for name in consumer.input]
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return model


def convert_tflite(tflite_path: str, opset: int = 17) -> onnx.ModelProto:
    """``tf2onnx.convert.from_tflite`` with the fixes above, byte-reproducible.

    ``from_tflite`` has no ``optimizers`` argument, so this makes the same call it makes
    (tf2onnx 1.17.0's ``_convert_common``) with ``optimizers=STABLE`` added.
    """
    import tensorflow as tf
    from tf2onnx import convert

    with tf.device("/cpu:0"):
        proto, _ = convert._convert_common(
            None, tflite_path=tflite_path, name=os.path.splitext(os.path.basename(tflite_path))[0],
            continue_on_error=True, opset=opset, custom_op_handlers=TFLITE_CUSTOM_OP_HANDLERS,
            optimizers=STABLE, target=None, custom_ops=None, custom_rewriter=None,
            extra_opset=None, shape_override=None, input_names=None, output_names=None,
            inputs_as_nchw=None, outputs_as_nchw=None, large_model=False,
            tensors_to_rename=None, initialized_tables=None, output_path=None,
        )
    return stable_names(drop_noop_reshapes(proto))
