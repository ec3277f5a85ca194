"""The .tflite's operator order (canonical, memory-lean) and profile rows named after source nodes."""

from __future__ import annotations

import random

import flatbuffers
import numpy as np
import onnx
import pytest
from ai_edge_litert import schema_py_generated as tfl_schema
from helpers import GraphBuilder, save

from edgec.build import BuildOptions, build
from edgec.lower.tflite.order import canonical
from edgec.profile.ops import summarize
from edgec.profile.xnnpack_rows import RowName, name_rows, operator_kinds


def downsampling_block() -> onnx.ModelProto:
    """A residual downsampling block as MobileNet-style nets have it: the block input feeds a
    strided depthwise conv → 1x1 conv branch and a max pool → channel pad branch. Nodes in
    depth-first order (the 1x1 conv before the max pool), as exporters write them."""
    g = GraphBuilder()
    stem = g.op("Conv", ["x", g.weight(16, 3, 3, 3), g.weight(16)], pads=[1] * 4, name="stem")
    dw = g.op("Conv", [stem, g.weight(16, 1, 3, 3), g.weight(16)], pads=[1] * 4, strides=[2, 2], group=16, name="dw")
    pw = g.op("Conv", [dw, g.weight(32, 16, 1, 1), g.weight(32)], name="pw")
    pool = g.op("MaxPool", [stem], kernel_shape=[2, 2], strides=[2, 2], name="pool")
    padded = g.op("Pad", [pool, g.const(np.array([0, 0, 0, 0, 0, 16, 0, 0], np.int64))], name="channel_pad")
    total = g.op("Add", [pw, padded], name="add")
    y = g.op("PRelu", [total, g.weight(32, 1, 1)], name="prelu")
    return g.model({"x": [1, 3, 32, 32]}, {y: [1, 32, 16, 16]})


def shuffled(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same graph with its nodes in a random valid topological order."""
    rng, nodes = random.Random(seed), list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    needs = [{producer[v] for v in node.input if v in producer} for node in nodes]
    done: list[int] = []
    while len(done) < len(nodes):
        done.append(rng.choice([i for i in range(len(nodes)) if i not in done and needs[i] <= set(done)]))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes[i] for i in done)
    return copy


@pytest.fixture(scope="module")
def block_tflite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("block")
    result = build(save(downsampling_block(), folder), "tflite-x86", folder / "out", BuildOptions(seed=3))
    assert result.verification.passed
    return result.artifacts[0]


def test_exporter_node_order_does_not_change_the_tflite(block_tflite, tmp_path):
    for seed in (0, 6):  # the max pool branch first; both pool and pad first
        folder = tmp_path / str(seed)
        folder.mkdir()
        model = shuffled(downsampling_block(), seed)
        assert [n.name for n in model.graph.node] != [n.name for n in downsampling_block().graph.node]
        artifact = build(save(model, folder), "tflite-x86", folder / "out", BuildOptions(seed=3)).artifacts[0]
        assert artifact.read_bytes() == block_tflite.read_bytes()


def test_canonical_form_ignores_operator_tensor_and_buffer_numbering(block_tflite):
    content = block_tflite.read_bytes()
    assert canonical(_scrambled(content, seed=0)) == canonical(_scrambled(content, seed=1)) == canonical(content)


def test_conversion_names_do_not_depend_on_the_converters_numbering(tmp_path):
    """The converter numbered its QUANTIZE/DEQUANTIZE outputs differently between runs; the
    canonical form names each after what it converts, so their names cannot make two files."""
    model_path = save(downsampling_block(), tmp_path)
    content = build(model_path, "tflite-x86", tmp_path / "out", BuildOptions(seed=3, precision="int8", speed_check=False)).artifacts[0].read_bytes()
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    graph, codes = model.subgraphs[0], [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    conversions = {tfl_schema.BuiltinOperator.QUANTIZE, tfl_schema.BuiltinOperator.DEQUANTIZE}
    outputs = [int(op.outputs[0]) for op in graph.operators if codes[op.opcodeIndex] in conversions]
    outputs = [t for t in outputs if t not in {int(i) for i in [*graph.inputs, *graph.outputs]}]
    assert len(outputs) >= 2, "the PRelu kept float puts conversions around it"
    assert all(graph.tensors[t].name.decode().rsplit("/", 1)[-1].rstrip("0123456789") in ("quantize", "dequantize") for t in outputs)
    for i, t in enumerate(outputs):
        graph.tensors[t].name = f"converter_numbering_{len(outputs) - i}".encode()
    assert canonical(_packed(model)) == canonical(content) == content


def test_a_graph_with_stateful_tensors_keeps_its_operator_order(block_tflite):
    """Ops reading and writing a variable tensor depend on file order, not only on data."""
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(_scrambled(block_tflite.read_bytes(), seed=3)), 0)
    model.subgraphs[0].tensors[0].isVariable = True
    content = _packed(model)
    assert operator_kinds(canonical(content)) == operator_kinds(content) != operator_kinds(canonical(block_tflite.read_bytes()))


def test_max_pool_runs_before_the_1x1_conv_so_the_block_input_dies_early(block_tflite):
    """After the depthwise conv, the max pool is the last reader of the block input (the
    block's largest tensor); running it before the 1x1 conv frees that input sooner."""
    kinds = operator_kinds(block_tflite.read_bytes())
    assert kinds.index("MAX_POOL_2D") < [i for i, k in enumerate(kinds) if k == "CONV_2D"][-1]


def test_profile_rows_are_named_after_the_onnx_nodes(block_tflite):
    from edgec.profile.litert_ops import profile_litert

    rows = summarize(profile_litert(block_tflite, threads=1, runs=3, warmup=1), median_ms=1.0)["top_nodes"]
    by_node = {row["node"]: row["op"] for row in rows}
    assert not [node for node in by_node if "unmapped" in node], by_node
    assert by_node["dw"].startswith("Convolution (NHWC, F32) DWConv")
    assert by_node["pool"].startswith("Max Pooling")
    assert by_node["prelu"].startswith("PReLU")


@pytest.mark.parametrize("operators, rows, expected", [
    # a RELU XNNPACK fused into the conv before it; an ADD whose activation became a Clamp row
    (["CONV_2D", "RELU", "ADD"], ["Convolution (NHWC, F32) IGEMM", "Add (ND)", "Clamp (NC)"], [0, 2, 2]),
    # one Copy row per concatenated input; an op outside XNNPACK under its TFLite name
    (["CONCATENATION", "SPLIT_V", "CONV_2D"], ["Copy (NC, X32)", "Copy (NC, X32)", "SPLIT_V", "Fully Connected (NC, F32) GEMM"], [0, 0, 1, 2]),
    # a reshape XNNPACK adds before a fully connected op that flattens its input
    (["FULLY_CONNECTED"], ["Static Reshape (NC)", "Fully Connected (NC, F32) GEMM"], [0, 0]),
    # fp16 weights' DEQUANTIZE ops run no XNNPACK operator
    (["DEQUANTIZE", "DEQUANTIZE", "DEPTHWISE_CONV_2D"], ["Convolution (NHWC, F32) DWConv"], [2]),
])
def test_rows_align_with_tflite_operators(operators, rows, expected):
    assert [r.operator for r in name_rows(operators, rows)] == expected


def test_rows_stay_unnamed_where_the_alignment_is_ambiguous_or_impossible():
    # the Clamp is the ADD's activation or the RELU's own row: both alignments are valid
    assert name_rows(["ADD", "RELU"], ["Add (ND)", "Clamp (NC)"]) == [RowName(0), RowName(None, (0, 1))]
    assert name_rows(["CONV_2D"], ["Softmax (NC, F32)"]) == [RowName(None)]


def _scrambled(content: bytes, seed: int) -> bytes:
    """The same model with its operators in another valid order and its tensors, buffers
    (but the empty buffer 0) and operator codes renumbered at random."""
    rng = random.Random(seed)
    model = tfl_schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    graph = model.subgraphs[0]
    producer = {int(t): i for i, op in enumerate(graph.operators) for t in op.outputs}
    needs = [{producer[int(t)] for t in op.inputs if int(t) in producer} for op in graph.operators]
    order: list[int] = []
    while len(order) < len(needs):
        order.append(rng.choice([i for i in range(len(needs)) if i not in order and needs[i] <= set(order)]))
    graph.operators = [graph.operators[i] for i in order]
    tensors = rng.sample(range(len(graph.tensors)), len(graph.tensors))
    new = {old: i for i, old in enumerate(tensors)}
    remap = lambda ids: np.array([new[int(t)] if t >= 0 else -1 for t in ids], dtype=np.int32)  # noqa: E731
    graph.tensors = [graph.tensors[old] for old in tensors]
    for op in graph.operators:
        op.inputs, op.outputs = remap(op.inputs), remap(op.outputs)
    graph.inputs, graph.outputs = remap(graph.inputs), remap(graph.outputs)
    for entry in [*model.signatureDefs[0].inputs, *model.signatureDefs[0].outputs]:
        entry.tensorIndex = new[entry.tensorIndex]
    buffers = [0, *rng.sample(range(1, len(model.buffers)), len(model.buffers) - 1)]
    new_buffer = {old: i for i, old in enumerate(buffers)}
    model.buffers = [model.buffers[old] for old in buffers]
    for t in graph.tensors:
        t.buffer = new_buffer[t.buffer]
    for entry in model.metadata:
        entry.buffer = new_buffer[entry.buffer]
    codes = rng.sample(range(len(model.operatorCodes)), len(model.operatorCodes))
    new_code = {old: i for i, old in enumerate(codes)}
    model.operatorCodes = [model.operatorCodes[old] for old in codes]
    for op in graph.operators:
        op.opcodeIndex = new_code[op.opcodeIndex]
    return _packed(model)


def _packed(model) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
