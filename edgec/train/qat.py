"""Quantization-aware training (``qat = true``) with tensorflow-model-optimization.

The model trains with its weights and activations fake-quantized the way the int8 stage
will quantize them: Conv/Dense kernels per output channel, symmetric, on the target's
integer grid (``max|w| / qmax``: 127, or 64 for ONNX Runtime's 7-bit x86 weights), and
activations on an asymmetric 8-bit grid over a range ``[low, high]`` holding zero.

Which activations: the ONNX values the int8 stage gives their own range, found in the
prepared graph and lowered to Keras by the same rule table, so each is a Keras tensor named
by its ONNX value (as ``edgec.train.features`` finds tensors): every float value a node
computes, except graph outputs (edgec keeps output heads float on ONNX Runtime and min/max on
TFLite), values only a Relu/Clip reads (both runtimes quantize after the activation, fused
into its producer) and outputs of ops that keep their input's scale (reshapes, max-pool,
padding, concatenation...). Those tensors' producing layers are wrapped by TFMOT's
``QuantizeWrapperV2`` one by one (``clone_model``; the model-level ``quantize_model``
refuses edgec's ``Identity`` output layers), with edgec's ``QuantizeConfig`` and quantizers.

Why not TFMOT's own quantizers: their range updates assign variables (a moving average of
min/max), which ``tf.vectorized_map`` cannot batch, and edgec's batch-1 Keras models train
many samples at once only through it. Here each range starts at the min/max the float model
reaches on the training samples (what calibration would find) and trains as a variable
through the straight-through estimator (LSQ's gradient: rounding passes gradients through,
clipping sends them to the range), parametrized as a factor ``exp(v)`` of the calibrated
bound, so Adam's steps are relative and a post-ReLU zero lower bound stays zero. Nothing is
assigned in the forward pass, so the wrapped model runs inside ``tf.vectorized_map`` like
the plain one. The learned ranges, keyed by ONNX value name, are what the int8 stage then
quantizes with (``edgec.stages.int8``): ORT's QDQ scales, the TFLite converter's calibrated
min/max.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import tensorflow as tf
import tf_keras as keras
from tensorflow_model_optimization.quantization import keras as tfmot_quantization

from edgec.graph import constant
from edgec.lower.tflite import KerasLowering
from edgec.passes.layout import CL_DOMAIN  # the layout pass's channels-last Conv/pooling ops

LEVELS = 255  # asymmetric 8-bit activations: 256 values, int8 and uint8 alike
# Ops whose output shares its input's scale in both runtimes' int8 (or holds no new values).
SAME_SCALE_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "GlobalMaxPool", "Pad",
                  "Slice", "Split", "Concat", "Gather", "Resize", "DepthToSpace", "SpaceToDepth", "Expand", "Tile"}
FUSED_ACTIVATIONS = {"Relu", "Clip"}  # a value only these read is quantized after them
BIASED_OPS = {"Conv", "Gemm", "MatMul"}  # their output, when only a constant Add reads it, is quantized after the Add
RANGE_BATCH = 32  # samples per run when the float model's ranges are measured
# Kernels quantized per output channel: the attribute holding it, and whether it is depthwise (channels = last two axes).
KERNELS = ((keras.layers.DepthwiseConv1D, "depthwise_kernel", True), (keras.layers.DepthwiseConv2D, "depthwise_kernel", True),
           (keras.layers.Conv1D, "kernel", False), (keras.layers.Conv2D, "kernel", False), (keras.layers.Dense, "kernel", False))
UNWRAPPED = (keras.layers.InputLayer,)


def _round(x: tf.Tensor) -> tf.Tensor:
    """Rounding whose gradient is the identity (the straight-through estimator)."""
    return x + tf.stop_gradient(tf.round(x) - x)


def fake_quant(x: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """``x`` on the asymmetric 8-bit grid over ``[low, high]`` (widened to hold zero, which
    both runtimes keep exact), the way ORT and TFLite derive scale and zero point from a range."""
    low, high = tf.minimum(low, 0.0), tf.maximum(high, 0.0)
    scale = tf.maximum(high - low, 1e-8) / LEVELS
    zero = tf.clip_by_value(_round(-low / scale), 0.0, LEVELS)
    return (tf.clip_by_value(_round(x / scale) + zero, 0.0, LEVELS) - zero) * scale


class ChannelWeights(tfmot_quantization.quantizers.Quantizer):
    """A kernel on the per-channel symmetric grid ``max|w| / qmax`` (what ORT's and TFLite's
    per-channel quantizers compute from the float weights); the identity for gradients."""

    def __init__(self, qmax: int, depthwise: bool):
        self.qmax, self.depthwise = qmax, depthwise

    def build(self, tensor_shape, name, layer) -> dict:
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        axes = list(range(len(inputs.shape) - (2 if self.depthwise else 1)))
        scale = tf.reduce_max(tf.abs(inputs), axis=axes, keepdims=True) / self.qmax
        scale = tf.where(scale > 0, scale, tf.ones_like(scale))
        quantized = tf.clip_by_value(tf.round(inputs / scale), -self.qmax, self.qmax) * scale
        return inputs + tf.stop_gradient(quantized - inputs)

    def get_config(self) -> dict:
        return {"qmax": self.qmax, "depthwise": self.depthwise}


class LearnedRange(tfmot_quantization.quantizers.Quantizer):
    """An activation on the 8-bit grid of a range that trains: ``low·exp(a)``, ``high·exp(b)``
    from the calibrated ``low``/``high``, ``a`` and ``b`` trainable (from 0)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(min(low, 0.0)), float(max(high, 0.0))

    def build(self, tensor_shape, name, layer) -> dict:
        self.variables = {side: layer.add_weight(f"{name}_log_{side}", shape=(), initializer=keras.initializers.Zeros(), trainable=True)
                          for side in ("low", "high")}
        return self.variables

    def __call__(self, inputs, training, weights, **kwargs):
        return fake_quant(inputs, *self.bounds(weights))

    def bounds(self, weights: dict) -> tuple[tf.Tensor, tf.Tensor]:
        return self.low * tf.exp(weights["low"]), self.high * tf.exp(weights["high"])

    def learned(self) -> list[float]:
        """The range as it stands, ``[low, high]``."""
        return [round(float(bound), 7) for bound in self.bounds(self.variables)]

    def get_config(self) -> dict:
        return {"low": self.low, "high": self.high}


class LayerConfig(tfmot_quantization.QuantizeConfig):
    """What one wrapped layer quantizes: its kernel (``attribute``, or none) and its output."""

    def __init__(self, attribute: str | None, weights: ChannelWeights | None, output: LearnedRange | None):
        self.attribute, self.weights, self.output = attribute, weights, output
        self.variable = None

    def get_weights_and_quantizers(self, layer):
        if not self.weights:
            return []
        self.variable = getattr(layer, self.attribute)
        return [(self.variable, self.weights)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        """The quantized kernel is what the layer's call reads, as with TFMOT's own configs; set
        past Keras's attribute tracking, which would otherwise drop the float kernel from the
        layer's weights (and shift the order the write-back reads them in)."""
        if self.weights:
            object.__setattr__(layer, self.attribute, quantize_weights[0])

    def restore(self, layer) -> None:
        """The layer reads its float kernel again."""
        if self.variable is not None:
            object.__setattr__(layer, self.attribute, self.variable)

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output] if self.output else []

    def get_config(self) -> dict:
        return {}


def quantized_values(prepared: ir.Model, kept: set[str]) -> list[str]:
    """The values of ``prepared`` (names also in ``kept``: the model written back) whose ranges
    the int8 stage chooses (see the module)."""
    outputs = {v.name for v in prepared.graph.outputs}
    names = []
    for node in prepared.graph:
        if node.op_type in SAME_SCALE_OPS or node.domain not in ("", "ai.onnx", CL_DOMAIN):
            continue
        for value in node.outputs:
            consumers = [user for user, _ in value.uses()]
            if (value.name in kept and value.name not in outputs and value.dtype == ir.DataType.FLOAT and consumers
                    and not all(user.op_type in FUSED_ACTIVATIONS for user in consumers)
                    and not (node.op_type in BIASED_OPS and all(_adds_constant(user) for user in consumers))):
                names.append(value.name)
    return names


def _adds_constant(node: ir.Node) -> bool:
    """An ``Add`` of a constant: a bias TFLite's converter folds into the Conv/Dense before it."""
    return node.op_type == "Add" and any(constant(v) is not None for v in node.inputs)


class QuantizationAware:
    """``model`` (built from ``lowering``'s layers) with TFMOT wrappers that fake-quantize
    the kernels of its trainable Conv/Dense layers and the tensors of ``names``; ``model``'s
    own layers keep the float weights the optimizer trains."""

    def __init__(self, model: keras.Model, lowering: KerasLowering, names: list[str], qmax: int, inputs: list[np.ndarray]):
        self.qmax = qmax
        producers = self._producers(lowering, names)
        self.calibrated = dict(zip(producers, observed_ranges(model, [lowering.tensors[n] for n in producers], inputs)))
        outputs = {layer: name for name, layer in producers.items()}
        self.quantizers: dict[str, LearnedRange] = {}
        self.wrappers: dict[str, keras.layers.Layer] = {}

        def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
            kernel = next(((attribute, depthwise) for kind, attribute, depthwise in KERNELS if isinstance(layer, kind)), None)
            weights = ChannelWeights(qmax, kernel[1]) if kernel and layer.trainable else None
            output = LearnedRange(*self.calibrated[outputs[layer.name]]) if layer.name in outputs else None
            if weights is None and output is None:
                return layer
            if output is not None:
                self.quantizers[outputs[layer.name]] = output
            self.wrappers[layer.name] = tfmot_quantization.QuantizeWrapperV2(layer, LayerConfig(kernel and kernel[0], weights, output))
            return self.wrappers[layer.name]

        self.model = keras.models.clone_model(model, clone_function=wrap)
        self.skipped = sorted(set(names) - set(producers))

    @staticmethod
    def _producers(lowering: KerasLowering, names: list[str]) -> dict[str, str]:
        """Value name → the Keras layer whose only output it is (first value per layer).
        Values computed by recorded TF ops (``TFOpLambda``, called with arguments a wrapper
        cannot pass on) or by input layers are left unquantized in training."""
        found: dict[str, str] = {}
        for name in names:
            history = getattr(lowering.tensors.get(name), "_keras_history", None)
            layer = history.layer if history is not None else None
            if (layer is None or isinstance(layer, UNWRAPPED) or type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda")
                    or len(layer._inbound_nodes) != 1 or len(tf.nest.flatten(layer.output)) != 1 or layer.name in found.values()):
                continue
            found[name] = layer.name
        return found

    def strip(self) -> None:
        """Unwrap: the model's own layers compute with their float kernels again (what goes back to ONNX)."""
        for wrapper in self.wrappers.values():
            wrapper.quantize_config.restore(wrapper.layer)

    def ranges(self) -> dict[str, list[float]]:
        """The learned range of each quantized value, by ONNX value name."""
        return {name: quantizer.learned() for name, quantizer in self.quantizers.items()}

    def report(self) -> dict:
        """What QAT quantized, and the ranges it learned against the calibrated ones."""
        learned = self.ranges()
        widths = [(h - lo) / (self.calibrated[n][1] - self.calibrated[n][0]) for n, (lo, h) in learned.items()
                  if self.calibrated[n][1] > self.calibrated[n][0]]
        return {
            "weights": {"per_channel": True, "symmetric": True, "qmax": self.qmax,
                        "layers": sum(1 for w in self.wrappers.values() if w.quantize_config.weights)},
            "activations": {"levels": LEVELS + 1, "tensors": len(learned), "not_quantized": self.skipped,
                            "mean_width_vs_calibrated": round(float(np.mean(widths)), 4) if widths else 1.0},
            "ranges": learned,
            "calibrated_ranges": {n: [round(lo, 7), round(h, 7)] for n, (lo, h) in self.calibrated.items()},
        }


def observed_ranges(model: keras.Model, tensors: list, inputs: list[np.ndarray]) -> list[tuple[float, float]]:
    """Min and max of each of ``model``'s ``tensors`` over the stacked Keras-layout ``inputs``."""
    if not tensors:
        return []
    probe = keras.Model(model.inputs, tensors)

    @tf.function(reduce_retracing=True)
    def run(xs):
        result = tf.vectorized_map(lambda x: probe(list(x), training=False), xs)
        return [(tf.reduce_min(t), tf.reduce_max(t)) for t in tf.nest.flatten(result)]

    lows, highs = np.full(len(tensors), np.inf), np.full(len(tensors), -np.inf)
    for i in range(0, len(inputs[0]), RANGE_BATCH):
        for k, (low, high) in enumerate(run(tuple(tf.constant(a[i:i + RANGE_BATCH]) for a in inputs))):
            lows[k], highs[k] = min(lows[k], float(low)), max(highs[k], float(high))
    return [(float(lo), float(h)) for lo, h in zip(lows, highs)]
