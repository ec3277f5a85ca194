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

from edgec.images import ImagePreprocess

# Called after each epoch with {"epoch", "epochs", "loss", "metric", "seconds"}.
EpochObserver = Callable[[dict], None]


@dataclasses.dataclass(frozen=True)
class TrainingContext:
    """What a training step needs from the build: the source model to distill from (ONNX
    bytes), the seed, how image folders become tensors, and where to report each epoch.
    (This module stays free of TensorFlow; the step itself is ``edgec.train.finetune``.)"""

    source: bytes
    seed: int = 0
    images: ImagePreprocess = ImagePreprocess()
    on_epoch: EpochObserver | None = None
