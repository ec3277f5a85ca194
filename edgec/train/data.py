"""What fine-tuning trains on: the user's samples in the Keras model's layout, the source
model's outputs on them (the distillation targets, computed once in ONNX Runtime), labels
if given, and a held-back validation part.

Arrays are stacked per model batch: ``[count, *model_input_shape]`` (the model's own batch,
usually 1, stays inside each element), so a batch-1 Keras model trains on many samples at
once through ``tf.vectorized_map`` without re-lowering it at another batch size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.errors import InputDataError
from edgec.graph import attr, normalize_axes
from edgec.verify import InputSet, run_all
from edgec.runtime import Runner

SOFTMAX_OPS = {"Softmax": False, "LogSoftmax": True}  # op → its output is a log-probability


@dataclasses.dataclass(frozen=True)
class Head:
    """How one output is distilled: ``softmax`` heads by KL divergence over ``axis`` (in the
    Keras layout), everything else (``regression``: logits, boxes, masks; ``feature``: an
    intermediate tensor, ``edgec.train.features``) by MSE."""

    name: str
    kind: str
    axis: int | None = None
    log: bool = False  # a LogSoftmax output

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind}


def heads(model: ir.Model, io_outputs: list[dict]) -> list[Head]:
    """One head per output, in Keras output order; a softmax head when a Softmax/LogSoftmax
    produces the output."""
    producers = {v.name: v.producer() for v in model.graph.outputs}
    found = []
    for entry in io_outputs:
        node = producers.get(entry["name"])
        if node is None or node.op_type not in SOFTMAX_OPS or node.domain not in ("", "ai.onnx"):
            found.append(Head(entry["name"], "regression"))
            continue
        rank = len(entry["perm"])
        axis = normalize_axes([attr(node, "axis", -1)], rank)[0]
        found.append(Head(entry["name"], "softmax", entry["perm"].index(axis), SOFTMAX_OPS[node.op_type]))
    return found


@dataclasses.dataclass
class Split:
    inputs: list[np.ndarray]  # per Keras input: [count, *keras_shape]
    targets: list[np.ndarray]  # per Keras output: the source model's, in the Keras layout
    labels: np.ndarray | None  # [count, model_batch] ints

    def __len__(self) -> int:
        return len(self.inputs[0])

    def with_targets(self, more: list[np.ndarray]) -> Split:
        return Split(self.inputs, [*self.targets, *more], self.labels)

    def take(self, index: np.ndarray) -> Split:
        return Split([a[index] for a in self.inputs], [t[index] for t in self.targets],
                     None if self.labels is None else self.labels[index])


def training_data(data: InputSet, teacher: Runner, io: dict, validation: float, seed: int, mix: int = 0,
                  augment: int = 0) -> tuple[Split, Split]:
    """(train, validation) from ``data``: inputs and teacher outputs moved into the Keras
    layout, split by a seeded permutation (at least one model batch held back). ``mix``
    adds that many blends per training sample, ``augment`` that many augmented copies (below)."""
    if len(data.batches) < 2:
        raise InputDataError(f"Fine-tuning data {data.source} has {len(data.batches)} sample(s); it needs at least 2 "
                             "(one is held back to validate).", hint="Give more samples.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.batches))
    held = min(len(order) - 1, max(1, round(validation * len(order))))
    labels = None if data.labels is None else np.asarray(data.labels).reshape(len(data.batches), -1)
    train, kept = _blended(data.batches, labels, np.sort(order[held:]), mix, rng)
    copies, origin = _augmented(data.batches, np.sort(order[held:]), augment, _image_axes(io), labels is None, rng)
    train, kept = train + copies, np.concatenate([kept, origin]).astype(np.int64)
    return (_split(train, None if labels is None else labels[kept], teacher, io),
            _split([data.batches[i] for i in np.sort(order[:held])], None if labels is None else labels[np.sort(order[:held])], teacher, io))


def _blended(batches: list, labels, index: np.ndarray, mix: int, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """The samples at ``index`` plus ``mix`` blends of each with another one (``λ·a + (1−λ)·b``,
    λ in [0.5, 1) on float inputs; a blend keeps ``a``'s label). For distillation a blend is as
    good a question as a real sample, since the source model answers it: few photos then teach
    more of the input space. Returns the samples and which original each one's label is."""
    samples, origin = [batches[i] for i in index], list(index)
    for _ in range(mix):
        for i, j in zip(index, rng.permutation(index)):
            weight = rng.uniform(0.5, 1.0)
            samples.append({k: (weight * v + (1 - weight) * batches[j][k]).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
                            for k, v in batches[i].items()})
            origin.append(i)
    return samples, np.array(origin)


def _image_axes(io: dict) -> dict[str, tuple[int, int]]:
    """Per 4-D input, its (height, width) axes in the source layout: the Keras layout is
    channels-last, so they are where the layout permutation takes Keras axes 1 and 2 from."""
    return {e["name"]: (e["perm"][1], e["perm"][2]) for e in io["inputs"] if len(e["perm"]) == 4}


def _augmented(batches: list, index: np.ndarray, augment: int, axes: dict[str, tuple[int, int]], flip: bool,
               rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """``augment`` copies of each sample at ``index``, image inputs shifted by up to an eighth
    of their size (edges repeated), mirrored left-right half the time when ``flip`` (only
    without labels: a mirrored digit is not its label), and with contrast and brightness
    moved by up to 20% and 10% of the image's value range (kept inside it). The source model answers
    each copy, so a few photos ask it many more questions."""
    samples, origin = [], []
    for _ in range(augment):
        for i in index:
            samples.append({k: _augment(v, axes[k], flip, rng) if k in axes and np.issubdtype(v.dtype, np.floating) else v
                            for k, v in batches[i].items()})
            origin.append(i)
    return samples, np.array(origin, np.int64)


def _augment(image: np.ndarray, axes: tuple[int, int], flip: bool, rng: np.random.Generator) -> np.ndarray:
    dtype, low, high = image.dtype, float(image.min()), float(image.max())
    for axis in axes:
        limit = image.shape[axis] // 8
        shift = int(rng.integers(-limit, limit + 1))
        pad = [(max(shift, 0), max(-shift, 0)) if a == axis else (0, 0) for a in range(image.ndim)]
        image = np.take(np.pad(image, pad, mode="edge"), np.arange(image.shape[axis]) + max(-shift, 0), axis=axis)
    if flip and rng.random() < 0.5:
        image = np.flip(image, axes[1])
    mean = image.mean()
    image = mean + rng.uniform(0.8, 1.2) * (image - mean) + rng.uniform(-0.1, 0.1) * (high - low)
    return np.ascontiguousarray(np.clip(image, low, high), dtype=dtype)


def _split(batches: list, labels, teacher: Runner, io: dict) -> Split:
    targets = run_all(teacher, batches)
    inputs = [np.stack([b[e["name"]].transpose(e["perm"]) for b in batches]) for e in io["inputs"]]
    outputs = [np.ascontiguousarray(targets[e["name"]].transpose(0, *[p + 1 for p in e["perm"]])) for e in io["outputs"]]
    return Split(inputs, outputs, labels)


def classifier_output(model: ir.Model, io_outputs: list[dict], labels: np.ndarray) -> tuple[int, int]:
    """(Keras output index, classes) of the output labels are for: the first ``[batch,
    classes]`` output. Labels must be class indices in range."""
    for i, entry in enumerate(io_outputs):
        value = next(v for v in model.graph.outputs if v.name == entry["name"])
        dims = [int(d) for d in value.shape.dims]
        if len(dims) == 2:
            classes = dims[1]
            if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes:
                raise InputDataError(
                    f"Fine-tuning labels must be one class index in [0, {classes}) per sample for output '{value.name}' "
                    f"{dims}; got {labels.dtype} values in [{labels.min()}, {labels.max()}].",
                    hint="Save the 'label' array as integer class indices, or leave it out to distill from the source model alone.")
            return i, classes
    raise InputDataError("The fine-tuning data has a 'label' array, but the model has no [batch, classes] output to train with it.",
                         hint="Leave the 'label' array out: without labels edgec distills from the source model's outputs.")
