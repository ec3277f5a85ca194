"""Channel gates with an L1 penalty (network slimming, Liu et al. 2017): learned channel importance.

Every prunable channel class of the model (the channels :mod:`edgec.passes.channels` says
must go together: a conv's output, the residual stream it is added to...) gets one gate, a
trainable factor starting at 1 that scales the channel where its producers compute it
(their kernel's output slice and bias, so a class shared by several convs is scaled alike).
The model trains toward the source as in any fine-tuning, plus ``penalty`` × the mean |gate|:
gates the outputs can do without shrink toward 0, and the weights around them adapt while
they do. At the end each gate is folded into its producers' weights (exact: the producer is
linear), so the channels' weight norms are the learned importance that channel pruning ranks
by afterwards, globally (``edgec.recipe`` puts this step before a ``prune`` step with
``importance = "gates"``).

Network slimming gates the BatchNorm scale, which normalization makes the channel's only
scale; here the producer's kernel can grow while its gate shrinks, so the gate alone is not
the importance, the folded weight norm is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import tensorflow as tf
import tf_keras as keras

from edgec.passes.channels import ChannelGraph
from edgec.train.loop import WeightConstraint

# Keras layers a producer becomes whose output channels are the last axis of the kernel (and of the bias).
GATED_LAYERS = {keras.layers.Conv1D: "kernel", keras.layers.Conv2D: "kernel", keras.layers.Dense: "kernel",
                keras.layers.DepthwiseConv1D: "depthwise_kernel", keras.layers.DepthwiseConv2D: "depthwise_kernel"}


# Gates are this times their variable: Adam moves a variable by about the learning rate per
# step whatever its gradient, so a fine-tuning rate (1e-3) alone moves a gate of 1 by at most
# 0.2 in 200 steps, too little to tell channels apart (measured: median gate 0.985 after 68).
GATE_SPEED = 10.0


@dataclasses.dataclass
class _Gated:
    """One Keras layer scaled by gates: its kernel and bias variables, and per output channel
    the index of its gate (one past the last gate for a frozen channel: a constant 1)."""

    layer: keras.layers.Layer
    attribute: str
    kernel: tf.Variable
    bias: tf.Variable | None
    index: np.ndarray


class ChannelGates(WeightConstraint):
    """Gates on ``model``'s prunable channel classes, applied to the Keras layers they map to."""

    def __init__(self, model: ir.Model, lowering, penalty: float, steps: int):
        graph = ChannelGraph(model.graph)
        roots = sorted({graph.find(int(a)) for s in graph.sources for a in s.atoms if not graph.frozen(int(a))})
        position = {root: i for i, root in enumerate(roots)}
        self.penalty_weight, self.steps = penalty, steps
        self.variable = tf.Variable(tf.fill([len(roots)], 1.0 / GATE_SPEED), name="channel_gates")  # gate / GATE_SPEED
        self.gated: list[_Gated] = []
        for source in graph.sources:
            index = np.array([len(roots) if graph.frozen(int(a)) else position[graph.find(int(a))] for a in source.atoms])
            layer = _producer(lowering, source.node.name, source.count)
            if layer is not None and layer.trainable and (index < len(roots)).any():
                attribute = GATED_LAYERS[type(layer)]
                self.gated.append(_Gated(layer, attribute, getattr(layer, attribute), getattr(layer, "bias", None), index))

    @property
    def gates(self) -> tf.Tensor:
        return GATE_SPEED * self.variable

    def trainable(self, model: keras.Model) -> list[tf.Variable]:
        return [*model.trainable_variables, self.variable] if self.gated else model.trainable_variables

    def before_forward(self) -> None:
        """Each gated layer computes with its kernel and bias scaled by its channels' gates
        (tensors set past Keras's attribute tracking, so ``layer.weights`` keeps its order)."""
        for g in self.gated:
            kernel, bias = self._scaled(g)
            object.__setattr__(g.layer, g.attribute, kernel)
            if g.bias is not None:
                object.__setattr__(g.layer, "bias", bias)

    def penalty(self) -> tf.Tensor:
        return self.penalty_weight * tf.reduce_mean(tf.abs(self.gates)) if self.gated else tf.constant(0.0)

    def settled(self, steps_done: int) -> bool:
        """Only the weights at the end of the planned steps count: earlier ones are less sparse
        (keeping the untrained weights would rank channels by their norms alone)."""
        return steps_done >= self.steps

    def fold(self) -> None:
        """Put the trained gates into the weights and give the layers their variables back."""
        for g in self.gated:
            kernel, bias = self._scaled(g)
            object.__setattr__(g.layer, g.attribute, g.kernel)
            g.kernel.assign(kernel)
            if g.bias is not None:
                object.__setattr__(g.layer, "bias", g.bias)
                g.bias.assign(bias)

    def _scaled(self, g: _Gated) -> tuple[tf.Tensor, tf.Tensor | None]:
        per_channel = tf.gather(tf.concat([self.gates, [1.0]], 0), g.index)
        shape = g.kernel.shape
        if g.attribute == "depthwise_kernel":  # [..., in, multiplier]: output channel c = in * multiplier + m
            per_channel = tf.reshape(per_channel, shape[-2:])
        kernel = g.kernel * per_channel
        return kernel, None if g.bias is None else g.bias * tf.reshape(per_channel, [-1])

    def report(self) -> dict:
        """The gates after training: how many, and how many fell below a tenth and a half."""
        values = np.abs(self.gates.numpy())
        return {"gates": int(values.size), "layers": len(self.gated), "penalty": self.penalty_weight,
                "below_0.1": int((values < 0.1).sum()), "below_0.5": int((values < 0.5).sum()),
                "median": round(float(np.median(values)), 4) if values.size else None}


def _producer(lowering, node: str, channels: int) -> keras.layers.Layer | None:
    """The Keras layer of ONNX node ``node`` that computes its ``channels`` output channels."""
    for name in lowering.layers.get(node, []):
        layer = lowering.model.get_layer(name)
        attribute = GATED_LAYERS.get(type(layer))
        if attribute is not None:
            shape = getattr(layer, attribute).shape
            outputs = shape[-1] * (shape[-2] if attribute == "depthwise_kernel" else 1)
            if outputs == channels:
                return layer
    return None
