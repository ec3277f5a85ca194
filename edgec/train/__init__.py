"""Recovery by training: fine-tune a compressed model on the user's samples.

The model is trained as the tf_keras model edgec's TFLite lowering builds from it (real
Conv2D/Dense/... layers), then the trained weights are written back into the ONNX
initializers they came from (``edgec.train.trace``), so every backend builds from the
fine-tuned ONNX. Targets are the *source* model's outputs on the same samples (computed once
in ONNX Runtime): softmax heads are distilled by KL divergence at a temperature, other
outputs by variance-scaled MSE; a ``label`` array adds cross-entropy on the ``[batch,
classes]`` output. Users rarely have labels for a production model; photos are enough.

As a recipe step::

    [[step]]
    pass = "finetune"
    data = "photos/"      # same formats as --calib / --inputs
    epochs = 5
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from edgec.checks import above, at_least, one_of, within
from edgec.errors import EdgecError, OptionError
from edgec.runtime import TensorSpec
from edgec.verify import InputSet

SCHEDULES = ("constant", "cosine")
# Called after each epoch with {"epoch", "epochs", "loss", "metric", "seconds"}.
EpochObserver = Callable[[dict], None]
# Reads a step's ``data`` (a path) as samples for these inputs; the build owns the filesystem.
SampleReader = Callable[[str, list[TensorSpec]], InputSet]


@dataclasses.dataclass(frozen=True)
class TrainingContext:
    """What a training step needs from the build: the source model to distill from (ONNX
    bytes), the seed, how its data is read, and where to report each epoch.
    (This module stays free of TensorFlow; the step itself is ``edgec.train.finetune``.)"""

    source: bytes
    read: SampleReader
    seed: int = 0
    on_epoch: EpochObserver | None = None
    # The int8 build's largest integer weight (its target's scheme), which QAT trains toward; None: not an int8 build.
    weight_qmax: int | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Options of the ``finetune`` step (``--finetune DATA --epochs N --lr ...``)."""

    data: str
    epochs: int = 5
    lr: float = 1e-4  # Adam at its default 1e-3 cost the zoo resnet 4.7 points in one epoch
    batch_size: int = 32
    budget_s: float | None = None
    validation: float = 0.1  # share of the data held back for early stopping
    patience: int = 2  # epochs without a better validation metric before stopping
    schedule: str = "constant"  # learning rate over the epochs: constant, or cosine (decays to 0 after a warmup)
    warmup: float = 0.0  # cosine: share of the steps spent ramping the rate up from a tenth
    temperature: float = 2.0
    distill_weight: float = 1.0
    features: float = 0.0  # weight of distilling the residual stages' tensors too (edgec.train.features); 0: outputs only
    mix: int = 0  # blends of two samples added per training sample (few photos, no labels)
    augment: int = 0  # shifted/mirrored/recoloured copies added per training sample (image inputs)
    sparsity: float | None = None  # prune Conv/Dense kernels gradually to this share of zeros while training (TFMOT)
    clusters: int | None = None  # cluster Conv/Dense kernels to this many values while training (TFMOT)
    gates: float | None = None  # train a gate per prunable channel with this L1 penalty, folded in after (edgec.train.gates)
    qat: bool = False  # train with weights and activations fake-quantized as the int8 stage quantizes them (edgec.train.qat)
    seed: int | None = None  # the build's --seed when None

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise EdgecError("The finetune step needs data: a .npz/.npy file or a folder of images.",
                             hint='Give --finetune DATA, or data = "..." in the recipe step.')
        at_least("epochs (--epochs)", self.epochs, 1)
        above("lr (--lr)", self.lr, 0)
        at_least("batch_size (--batch-size)", self.batch_size, 1)
        above("budget_s (--finetune-budget-s)", self.budget_s, 0)
        within("validation", self.validation, 0, 1, include_high=False)
        at_least("patience", self.patience, 1)
        one_of("schedule", self.schedule, SCHEDULES)
        within("warmup", self.warmup, 0, 1, include_high=False)
        above("temperature", self.temperature, 0)
        at_least("distill_weight", self.distill_weight, 0)
        at_least("features", self.features, 0)
        at_least("mix", self.mix, 0)
        at_least("augment", self.augment, 0)
        at_least("clusters", self.clusters, 2)
        within("sparsity", self.sparsity, 0, 1, include_high=False)
        if self.sparsity is not None and self.clusters is not None:
            raise OptionError("The finetune step can prune (sparsity) or cluster (clusters) the weights, not both.",
                              hint="Give one of them; or two finetune steps, pruning first.")
        above("gates", self.gates, 0)
        if self.gates is not None and (self.sparsity is not None or self.clusters is not None or self.qat is True):
            raise OptionError("The finetune step's gates (channel importance for pruning) cannot be combined with sparsity, "
                              "clusters or qat in the same step.",
                              hint="Train the gates in a step of their own, before the prune step that uses them.")
        if not isinstance(self.qat, bool):
            raise OptionError(f"qat must be true or false, not {self.qat!r}.")
        if self.qat and (self.sparsity is not None or self.clusters is not None):
            raise OptionError("The finetune step's qat cannot be combined with sparsity or clusters in the same step.",
                              hint="Prune or cluster in a first finetune step, then a second one with qat = true.")
        at_least("seed", self.seed, 0)
