"""Which ONNX initializer elements each Keras weight holds, so trained weights go back exactly.

The TFLite lowering moves weights on their way into Keras: the layout pass permutes a
Gemm's rows after a channels-last Flatten, the Conv rule transposes OIHW into HWIO (or
reshapes it into a depthwise kernel), Gemm transposes ``B``, LayerNormalization broadcasts
its scale. Rather than keep an inverse beside every one of those rules, the model is
lowered a second time with each weight initializer's elements replaced by their own index
(1, 2, 3... across the model, exact in float32 up to 2**24): every element of every Keras
weight then names the ONNX element it was copied from. A weight counts as traced only if
those indices reproduce the real lowering's values exactly; a rule that computed its
weight (an LSTM's summed biases, a Gemm's ``alpha``) fails that check and its layer is
left untrained rather than written back wrongly.

Example: Conv W [O=2, I=1, 1, 1] = [[a]], [[b]] is coded as 1, 2; Keras's HWIO kernel
[1, 1, 1, 2] then reads [1, 2], so trained kernel values k0, k1 go back to W as [[k0]], [[k1]].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import tf_keras as keras

from edgec.errors import EdgecError

# ONNX ops whose constant inputs past the data input become Keras layer weights.
WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "PRelu", "LayerNormalization", "LSTM", "GRU"}
MAX_CODED = 2**24  # float32 holds every integer up to here exactly


@dataclasses.dataclass(frozen=True)
class TracedWeight:
    """One Keras weight and the flat indices of the initializer elements it holds."""

    layer: str
    index: int  # position in ``layer.weights``
    initializer: str
    elements: np.ndarray  # same shape as the weight


@dataclasses.dataclass
class WeightMap:
    traced: list[TracedWeight]
    frozen: list[str]  # Keras layers with weights that could not be traced

    def write_back(self, model: ir.Model, keras_model: keras.Model) -> list[str]:
        """Copy ``keras_model``'s traced weights into ``model``'s initializers (in place);
        elements held by several weights (a broadcast scale) take their mean. Returns the
        initializers changed."""
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for t in self.traced:
            value = keras_model.get_layer(t.layer).weights[t.index].numpy().astype(np.float64)
            size = model.graph.initializers[t.initializer].const_value.size
            sums.setdefault(t.initializer, np.zeros(size))
            counts.setdefault(t.initializer, np.zeros(size))
            np.add.at(sums[t.initializer], t.elements.reshape(-1), value.reshape(-1))
            np.add.at(counts[t.initializer], t.elements.reshape(-1), 1.0)
        for name, total in sums.items():
            value = model.graph.initializers[name]
            old = value.const_value.numpy()
            new = old.reshape(-1).copy()
            held = counts[name] > 0
            new[held] = (total[held] / counts[name][held]).astype(old.dtype)
            value.const_value = ir.tensor(new.reshape(old.shape), name=name)
        return sorted(sums)


def weight_initializers(model: ir.Model) -> list[str]:
    """Float initializers that feed a weight op past its data input."""
    names = []
    for node in model.graph.all_nodes():
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for value in node.inputs[1:]:
            if (value is not None and value.name in model.graph.initializers and value.name not in names
                    and value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT):
                names.append(value.name)
    return names


def coded_copy(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    """A copy of ``model`` whose weight initializers hold their element indices (from 1),
    and each initializer's first index."""
    coded = model.clone()
    offsets, next_code = {}, 1
    for name in weight_initializers(coded):
        value = coded.graph.initializers[name]
        array = value.const_value.numpy()
        offsets[name] = next_code
        value.const_value = ir.tensor(np.arange(next_code, next_code + array.size, dtype=array.dtype).reshape(array.shape), name=name)
        next_code += array.size
    if next_code > MAX_CODED:
        raise EdgecError(f"The model has {next_code - 1:,} weight values; fine-tuning can write back at most {MAX_CODED - 1:,}.",
                         hint="Fine-tune a smaller model, or compress it first (--prune, --factorize).")
    return coded, offsets


def layer_weights(keras_model: keras.Model) -> dict[str, list[np.ndarray]]:
    """Every layer's weights by layer name (taken before another lowering clears the session)."""
    return {layer.name: [w.numpy() for w in layer.weights] for layer in keras_model.layers if layer.weights}


def trace(model: ir.Model, real: keras.Model, coded: dict[str, list[np.ndarray]], offsets: dict[str, int]) -> WeightMap:
    """Match ``real`` (lowered from ``model``) and the weights of the lowering of its coded
    copy (``layer_weights``) layer by layer and weight by weight."""
    starts = sorted((start, name) for name, start in offsets.items())
    traced, frozen = [], []
    for layer in real.layers:
        if not layer.weights:
            continue
        found = [_trace_weight(model, layer.name, i, w.numpy(), coded, starts) for i, w in enumerate(layer.weights)]
        if all(t is not None for t in found):
            traced.extend(found)
        else:
            frozen.append(layer.name)
    return WeightMap(traced, frozen)


def _trace_weight(model: ir.Model, layer: str, index: int, real: np.ndarray, coded: dict[str, list[np.ndarray]],
                  starts: list[tuple[int, str]]) -> TracedWeight | None:
    codes = coded.get(layer, [])[index] if index < len(coded.get(layer, [])) else None
    if codes is None or codes.shape != real.shape or codes.size == 0 or codes.min() < 1 or not np.all(codes == np.round(codes)):
        return None
    codes = codes.astype(np.int64)
    position = np.searchsorted([s for s, _ in starts], codes.min(), side="right") - 1
    if position < 0:
        return None
    start, name = starts[position]
    source = model.graph.initializers[name].const_value.numpy().reshape(-1)
    elements = codes - start
    if elements.max() >= source.size or not np.array_equal(source[elements].astype(real.dtype), real):
        return None
    return TracedWeight(layer, index, name, elements)
