"""The data stages share: calibration samples, the share held back to verify on, verification inputs."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.errors import EdgecWarning
from edgec.runtime import Runner
from edgec.stages.context import BuildOptions
from edgec.stages.source import input_specs
from edgec.verify import InputSet, load_calibration, load_inputs, random_inputs

RANDOM_CALIBRATION_WARNING = (
    "Calibrating with random inputs: activation ranges and statistics will not match real data, "
    "and int8 or compressed accuracy may suffer. Pass --calib with real samples."
)


class Samples:
    """The calibration samples and the share held back from them to verify on, loaded on
    first use, once: only data-aware passes and int8 need them, or verification without --inputs."""

    def __init__(self, model: ir.Model, options: BuildOptions):
        self._load = functools.cache(functools.partial(calibration_sets, model, options))
        self._holds_back = bool(options.calib and not options.inputs)
        self._specs, self._options = input_specs(model), options

    def calibration(self) -> InputSet:
        return self._load()[0]

    @property
    def verify_on(self) -> InputSet:
        """Without --inputs: the calibration samples held back, else seeded random inputs made
        from the model's own inputs (token ids then span the vocabulary they index)."""
        return self._load()[1] if self._holds_back else random_inputs(self._specs, seed=self._options.seed)

    def first_verified(self) -> InputSet:
        """The first batch the artifact will be verified on (``verification_inputs``)."""
        if self._options.inputs:
            return load_inputs(self._options.inputs, self._specs, limit=1, images=self._options.images)
        return _subset(self.verify_on, [0], self.verify_on.source)


def calibration_sets(model: ir.Model, options: BuildOptions) -> tuple[InputSet, InputSet | None]:
    """Calibration samples from ``--calib``, or seeded random ones with a warning; and, when
    ``--calib`` is given without ``--inputs``, the samples held back from it to verify on."""
    specs = input_specs(model)
    if options.calib:
        loaded = load_calibration(options.calib, specs, limit=options.calib_samples, images=options.images)
        return (loaded, None) if options.inputs else held_out_split(loaded, options.seed)
    warnings.warn(RANDOM_CALIBRATION_WARNING, EdgecWarning, stacklevel=5)
    # seed + 1: a different stream from the random verification inputs.
    return random_inputs(specs, seed=options.seed + 1, count=options.calib_samples), None


HELD_OUT_EVERY = 4  # one calibration batch in this many verifies the artifact when no --inputs are given


def held_out_split(samples: InputSet, seed: int) -> tuple[InputSet, InputSet]:
    """(calibration, verification): a seeded choice of one batch in ``HELD_OUT_EVERY`` (at
    least one) held back from ``samples``, so an artifact is verified on real data it was not
    calibrated on, not on random noise far outside its calibrated ranges (a MobileNetV3-style
    net: cosine 0.106 on noise, 0.9997 on real data). A single batch both calibrates and verifies."""
    count = len(samples.batches)
    if count < 2:
        return samples, _subset(samples, [0], f"the only calibration batch ({samples.source}; too few to hold one back)")
    chosen = np.random.default_rng(seed).permutation(count)[: max(1, count // HELD_OUT_EVERY)]
    held = sorted(int(i) for i in chosen)
    kept = [i for i in range(count) if i not in set(held)]
    return (_subset(samples, kept, f"{samples.source}, less {len(held)} held out"),
            _subset(samples, held, f"held-out calibration samples ({len(held)} of {samples.source}, seed {seed})"))


def _subset(samples: InputSet, indices: Sequence[int], source: str) -> InputSet:
    """The batches of ``samples`` at ``indices``, with their labels."""
    labels = samples.labels
    if labels is not None:
        per = len(labels) // len(samples.batches)
        labels = np.concatenate([labels[i * per:(i + 1) * per] for i in indices])
    return InputSet([samples.batches[i] for i in indices], source, labels)


def verification_inputs(artifact: Runner, options: BuildOptions, fallback: InputSet | None = None) -> InputSet:
    """``--inputs``; else ``fallback`` (a build's :attr:`Samples.verify_on`); else seeded random data."""
    # The artifact's specs are static and named as in the source, so data is made from them.
    if options.inputs:
        return load_inputs(options.inputs, artifact.inputs, limit=options.max_samples, images=options.images)
    if fallback is not None:
        return _subset(fallback, range(min(options.max_samples or len(fallback.batches), len(fallback.batches))), fallback.source)
    return random_inputs(artifact.inputs, seed=options.seed)
