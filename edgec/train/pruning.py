"""Gradual magnitude pruning with tensorflow-model-optimization while fine-tuning.

Every trainable Conv (not depthwise) and Dense kernel is wrapped by TFMOT's
``prune_low_magnitude`` with a ``PolynomialDecay`` schedule from 0 to the target sparsity:
the smallest weights are zeroed a little at a time, 16 times over the first two thirds of
the planned steps, and the rest of the run recovers at the final sparsity (one-shot 50%
sparsity without training cost the zoo MobileNetV2 79 points). A schedule's ``frequency``
and ``end_step`` come from the real step count: TFMOT's default frequency of 100 steps
prunes nothing in a short run.

The wrappers are built around the model's own layers (``clone_model``, as TFMOT's
model-level wrapper refuses edgec's ``Identity`` output layers) but the training step runs
the plain model, vectorized over samples: the wrappers' mask updates assign variables,
which ``tf.vectorized_map`` cannot batch. After each optimizer step the wrappers update
their masks on schedule and write ``kernel * mask`` into the shared kernels, which is what
their own ``call`` does; so the plain layers hold the stripped, sparse kernels at the end
and ``strip_pruning`` has nothing left to remove.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from edgec.train.loop import WeightConstraint

# tf_keras's depthwise layers are not Conv1D/Conv2D subclasses: they stay dense (few weights per channel).
PRUNED_LAYERS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Dense)
MASK_UPDATES = 16  # the schedule raises the sparsity this many times
PRUNING_SHARE = 2 / 3  # of the planned steps; the rest train at the final sparsity


class GradualPruning(WeightConstraint):
    """The TFMOT wrappers of ``model``'s prunable layers and their schedule over ``steps``."""

    def __init__(self, model: keras.Model, sparsity: float, steps: int):
        from tensorflow_model_optimization.sparsity import keras as sparsity_api

        end = max(1, int(steps * PRUNING_SHARE))
        frequency = max(1, end // MASK_UPDATES)
        self.end_step = max(frequency, end - end % frequency)  # the last update lands on end_step
        schedule = sparsity_api.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=self.end_step, frequency=frequency)
        self.wrappers: list = []

        def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
            if not isinstance(layer, PRUNED_LAYERS) or not layer.trainable:
                return layer
            self.wrappers.append(sparsity_api.prune_low_magnitude(layer, pruning_schedule=schedule))
            return self.wrappers[-1]

        keras.models.clone_model(model, clone_function=wrap)  # builds each wrapper's mask around the shared kernel

    def after_step(self, step: tf.Tensor) -> None:
        """After optimizer step ``step`` (from 1): masks on schedule, then kernels *= masks."""
        for wrapper in self.wrappers:
            wrapper.pruning_step.assign(tf.cast(step, tf.int64))
            wrapper.pruning_obj.conditional_mask_update()
            wrapper.pruning_obj.weight_mask_op()

    def settled(self, steps_done: int) -> bool:
        """Whether the final sparsity is reached: only such weights may be kept as the best."""
        return steps_done >= self.end_step

    def sparsity(self) -> float:
        """The share of zeros in the pruned kernels."""
        kernels = [weight for w in self.wrappers for weight, _, _ in w.pruning_vars]
        zeros = sum(int(tf.size(k)) - int(tf.math.count_nonzero(k)) for k in kernels)
        total = sum(int(tf.size(k)) for k in kernels)
        return zeros / total if total else 0.0
