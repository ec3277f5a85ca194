"""The training loop: distillation from the source model's outputs (plus cross-entropy with
labels), Adam, seeded data order, early stopping on the validation split, a time budget.

Deterministic under a seed: TensorFlow's op determinism is switched on and the data order
comes from a seeded permutation, so the same data, options and seed give the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgec.errors import EdgecError
from edgec.train import EpochObserver
from edgec.train.data import Head, Split
from edgec.verify import cosine

EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    epochs: int
    lr: float
    batch_size: int
    budget_s: float | None
    patience: int
    temperature: float
    distill_weight: float
    seed: int
    schedule: str = "constant"
    warmup: float = 0.0
    feature_weight: float = 0.0

    def rate(self, step: int, total: int) -> float:
        """The learning rate at optimizer step ``step`` of ``total``: constant, or cosine decay to
        0 after a linear warmup from a tenth (a pruned model's first large steps can undo what
        survived)."""
        if self.schedule == "constant":
            return self.lr
        warmup = int(self.warmup * total)
        if step < warmup:
            return self.lr * (0.1 + 0.9 * step / warmup)
        return 0.5 * self.lr * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    def planned_epochs(self, done: int, elapsed_s: float, last_epoch_s: float) -> int:
        """Epochs to plan the schedule over after ``done`` of them: all, or as many as the budget
        fits at the last epoch's pace (re-planned each epoch, as the first one also traces the
        step, and a shared machine's pace changes), so a cosine schedule still ends decayed."""
        if self.budget_s is None:
            return self.epochs
        return max(done, min(self.epochs, done + int((self.budget_s - elapsed_s) / max(last_epoch_s, 1e-9))))


class WeightConstraint:
    """What a TFMOT technique adds to the training step, kept out of ``tf.vectorized_map``: its
    wrappers assign variables and gather, which vectorization cannot batch (clustering inside
    it took 75-124 s an epoch, a per-sample loop). The model itself runs unwrapped; this base
    constrains nothing."""

    def trainable(self, model: keras.Model) -> list[tf.Variable]:
        """The variables the optimizer trains."""
        return model.trainable_variables

    def before_forward(self) -> None:
        """Set the layers' weights for the next forward pass (inside the traced step)."""

    def after_step(self, step: tf.Tensor) -> None:
        """After optimizer step ``step`` (from 1)."""

    def penalty(self) -> tf.Tensor | float:
        """A term added to the training loss (inside the traced step)."""
        return 0.0

    def settled(self, steps_done: int) -> bool:
        """Whether weights after this many steps may be kept as the best."""
        return True


@dataclasses.dataclass
class History:
    losses: list[float] = dataclasses.field(default_factory=list)
    validation_losses: list[float] = dataclasses.field(default_factory=list)
    metrics: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    stopped: str = "epochs"  # epochs | early | budget


class Trainer:
    """Trains ``model`` (a batch-N Keras model, vectorized over stacked model batches)."""

    def __init__(self, model: keras.Model, heads: list[Head], classifier: tuple[int, int] | None, train: Split,
                 settings: LoopSettings, constraint: WeightConstraint | None = None):
        self.model, self.heads, self.classifier, self.settings = model, heads, classifier, settings
        self.constraint = constraint or WeightConstraint()
        # Regression heads are scaled by the targets' variance, so outputs of any magnitude weigh alike.
        self.scales = [float(np.var(t)) + EPS for t in train.targets]

    def outputs(self, inputs: tuple) -> list[tf.Tensor]:
        self.constraint.before_forward()
        result = tf.vectorized_map(lambda xs: self.model(list(xs), training=True), inputs)
        return list(result) if isinstance(result, (list, tuple)) else [result]

    def loss(self, outputs: list[tf.Tensor], targets: tuple, labels: tf.Tensor | None) -> tf.Tensor:
        terms = [(h.kind == "feature", self._distill(h, o, t, s)) for h, o, t, s in zip(self.heads, outputs, targets, self.scales)]
        total = self.settings.distill_weight * _mean([term for feature, term in terms if not feature])
        if any(feature for feature, _ in terms):
            total += self.settings.feature_weight * _mean([term for feature, term in terms if feature])
        if self.classifier is not None and labels is not None:
            index, _ = self.classifier
            total += self._cross_entropy(self.heads[index], outputs[index], labels)
        return total

    def _distill(self, head: Head, student: tf.Tensor, teacher: tf.Tensor, scale: float) -> tf.Tensor:
        if head.kind != "softmax":
            return tf.reduce_mean(tf.square(student - teacher)) / scale
        axis, temperature = head.axis + 1, self.settings.temperature  # + the stacking axis
        soft_teacher = tf.nn.softmax(_log_probs(head, teacher) / temperature, axis=axis)
        log_student = tf.nn.log_softmax(_log_probs(head, student) / temperature, axis=axis)
        kl = tf.reduce_sum(soft_teacher * (tf.math.log(soft_teacher + EPS) - log_student), axis=axis)
        return tf.reduce_mean(kl) * temperature**2

    def _cross_entropy(self, head: Head, output: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        logits = _log_probs(head, output) if head.kind == "softmax" else output
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    def metric(self, split: Split, predict: Callable[[Split], list[np.ndarray]]) -> float:
        """Top-1 accuracy with labels, else the lowest cosine of any output to the source's."""
        outputs = predict(split)
        if self.classifier is not None and split.labels is not None:
            index, _ = self.classifier
            return float(np.mean(outputs[index].argmax(-1) == split.labels))
        return min(cosine(o.astype(np.float64), t.astype(np.float64))
                   for h, o, t in zip(self.heads, outputs, split.targets) if h.kind != "feature")

    def predict(self, split: Split) -> list[np.ndarray]:
        parts = [self._predict(_tensors(part.inputs)) for part in self._batches(split)]
        return [np.concatenate([p[k].numpy() for p in parts]) for k in range(len(parts[0]))]

    def validation_loss(self, split: Split) -> float:
        """The training loss on ``split``, what early stopping watches (smoother than top-1)."""
        total = sum(float(self.loss(self._predict(_tensors(part.inputs)), _tensors(part.targets), self._labels(part))) * len(part)
                    for part in self._batches(split))
        return total / len(split)

    def _batches(self, split: Split) -> list[Split]:
        size = self.settings.batch_size
        return [split.take(np.arange(i, min(i + size, len(split)))) for i in range(0, len(split), size)]

    def _labels(self, split: Split) -> tf.Tensor:
        """Labels as the step takes them (zeros when there are none, which it then ignores)."""
        return tf.constant(split.labels if self.labeled(split) else np.zeros((len(split), 1), np.int64))

    def labeled(self, split: Split) -> bool:
        return self.classifier is not None and split.labels is not None

    @tf.function(reduce_retracing=True)
    def _predict(self, inputs: tuple) -> list[tf.Tensor]:
        return self.outputs(inputs)

    def fit(self, train: Split, validation: Split, observer: EpochObserver | None = None) -> History:
        s = self.settings
        keras.utils.set_random_seed(s.seed)
        tf.config.experimental.enable_op_determinism()
        # Not the user's to act on: vectorized_map's while-loop fallback (TFMOT's gather), retracing for a short last batch.
        tf.get_logger().setLevel("ERROR")
        optimizer, steps_per_epoch = keras.optimizers.Adam(s.rate(0, 1)), -(-len(train) // s.batch_size)
        variables = self.constraint.trainable(self.model)
        labeled = self.labeled(train)

        @tf.function(reduce_retracing=True)
        def step(inputs, targets, labels):
            with tf.GradientTape() as tape:
                loss = self.loss(self.outputs(inputs), targets, labels if labeled else None) + self.constraint.penalty()
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            self.constraint.after_step(optimizer.iterations)
            return loss

        # Untrained weights are kept if no epoch beats them, unless they are not yet constrained (pruning).
        history = History()
        best = (self.validation_loss(validation), [v.numpy() for v in variables]) if self.constraint.settled(0) else (np.inf, None)
        rng, start, waited, planned = np.random.default_rng(s.seed), time.perf_counter(), 0, s.epochs
        for epoch in range(1, s.epochs + 1):
            began, losses = time.perf_counter(), []
            order = rng.permutation(len(train))
            for i in range(0, len(order), s.batch_size):
                batch = train.take(order[i:i + s.batch_size])
                optimizer.learning_rate.assign(s.rate(int(optimizer.iterations), planned * steps_per_epoch))
                losses.append(float(step(_tensors(batch.inputs), _tensors(batch.targets), self._labels(batch))) * len(batch))
                self._check_budget(epoch, start, (i + s.batch_size) / len(order))
            history.losses.append(round(sum(losses) / len(train), 6))
            history.validation_losses.append(round(self.validation_loss(validation), 6))
            history.metrics.append(round(self.metric(validation, self.predict), 6))
            if observer:
                observer({"epoch": epoch, "epochs": s.epochs, "loss": history.losses[-1], "validation_loss": history.validation_losses[-1],
                          "metric": history.metrics[-1], "seconds": time.perf_counter() - began})
            settled = self.constraint.settled(int(optimizer.iterations))  # else no epoch counts yet
            if settled and history.validation_losses[-1] < best[0]:
                best, waited, history.best_epoch = (history.validation_losses[-1], [v.numpy() for v in variables]), 0, epoch
            elif settled:
                waited += 1
            if waited >= s.patience and epoch < s.epochs:
                history.stopped = "early"
                break
            planned = s.planned_epochs(epoch, time.perf_counter() - start, time.perf_counter() - began)
            if epoch < s.epochs and epoch >= planned:
                history.stopped = "budget"
                break
        for variable, value in zip(variables, best[1] or []):  # none kept: a budget stopped pruning early
            variable.assign(value)
        return history

    def _check_budget(self, epoch: int, start: float, done: float) -> None:
        """The first epoch must fit the budget; stop early when it will not, with an estimate."""
        elapsed = time.perf_counter() - start
        if epoch == 1 and self.settings.budget_s is not None and elapsed > self.settings.budget_s:
            needed = elapsed / max(min(done, 1.0), 1e-6)
            raise EdgecError(f"Fine-tuning budget of {self.settings.budget_s:g} s is too small for one epoch "
                             f"(about {needed:.0f} s here).",
                             hint="Raise --finetune-budget-s, or give fewer samples.")


def _mean(terms: list[tf.Tensor]) -> tf.Tensor:
    return tf.add_n(terms) / len(terms)


def _log_probs(head: Head, output: tf.Tensor) -> tf.Tensor:
    return output if head.log else tf.math.log(tf.maximum(output, EPS))


def _tensors(arrays: list[np.ndarray]) -> tuple:
    return tuple(tf.constant(a) for a in arrays)
