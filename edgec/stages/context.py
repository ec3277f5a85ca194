"""What every build stage receives: the build's options, and where it reports progress."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from edgec.checks import at_least, one_of, option, within
from edgec.crash import at
from edgec.images import ImagePreprocess
from edgec.passes.pipeline import PassRecord
from edgec.passes.quantize import CALIBRATION_METHODS
from edgec.profile import Device, ProfileSettings
from edgec.recipe import Step, check_training_steps

class Progress(Protocol):
    """How a build reports what it is doing (the CLI shows it; the API ignores it)."""

    def stage(self, description: str) -> contextlib.AbstractContextManager: ...

    def pass_done(self, record: PassRecord, seconds: float) -> None: ...

    # A progress may also have ``epoch(info)``, called after each fine-tuning epoch with
    # {"epoch", "epochs", "loss", "validation_loss", "metric", "seconds"} (edgec.train).


class SilentProgress:
    def stage(self, description: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def pass_done(self, record: PassRecord, seconds: float) -> None:
        pass


class Marked:
    """Progress whose stages also mark where a bug strikes, for the crash message (edgec.crash)."""

    def __init__(self, shown: Progress):
        self.shown = shown

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        with at("stage", description), self.shown.stage(description):
            yield

    def pass_done(self, record: PassRecord, seconds: float) -> None:
        self.shown.pass_done(record, seconds)

    def epoch(self, info: dict) -> None:
        if hasattr(self.shown, "epoch"):
            self.shown.epoch(info)


@dataclasses.dataclass
class BuildOptions:
    input_shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    inputs: str | None = None  # .npz/.npy verification inputs; random when None
    max_samples: int | None = None
    tolerance: float | None = None  # overrides the target's max relative error
    min_cosine: float | None = None  # overrides the target's minimum cosine
    seed: int = 0
    precision: str | None = None  # fp32 / fp16 / int8; the target's when None
    # int8 calibration: .npz/.npy file, image folder, or a callable returning samples; random (with a warning) when None
    calib: str | Callable[[], Iterable[Any]] | None = None
    calib_samples: int = 128
    int8_io: bool = False  # int8 artifacts take and return int8 tensors instead of float
    images: ImagePreprocess = ImagePreprocess()  # how image folders given as inputs/calib become tensors
    calib_method: str | None = None  # minmax / percentile / entropy; the target's when None
    max_drop: float | None = None  # int8: largest top-1 drop (fraction) allowed on labeled calibration data
    keep_float: Sequence[str] = ()  # node names int8 builds must keep in float
    speed_check: bool = True  # int8: measure against fp32 on this host and ship the faster
    speed_device: str | Device | None = None  # ...on this inventory device instead (e.g. emulated-a76 for arm targets)
    # int8 accuracy recovery; None = edgec decides (see recover_accuracy)
    equalize: bool | None = None  # cross-layer equalization where it is exact (Relu/PRelu/LeakyRelu chains)
    equalize_relu6: bool = False  # ...and across ReLU6 too, replacing it by Relu (changes the function)
    bias_correction: bool | None = None  # cancel the mean output shift of weight rounding
    equalize_activations: bool | None = None  # shrink outlier activation channels into the next Conv (per-channel schemes)
    adaround: bool = False  # learn each weight's rounding on --calib (AdaRound) before bias correction
    # Compression passes run after canonicalization (pruning, factorization...; see edgec.recipe)
    recipe: Sequence[Step] = ()
    profile_device: str | Device | None = None  # profile the artifact on this device (report "profile" + report.html)
    devices: str | None = None  # device inventory file that names profile_device (targets/devices.toml otherwise)
    profile_settings: ProfileSettings | None = None  # how; defaults and the device's own threads otherwise

    def __post_init__(self) -> None:
        """A value out of range fails here, before any work (the CLI's options come here too)."""
        at_least(option("max_samples"), self.max_samples, 1)
        at_least(option("calib_samples"), self.calib_samples, 1)
        at_least(option("tolerance"), self.tolerance, 0)
        within(option("min_cosine"), self.min_cosine, 0, 1)
        within(option("max_drop"), self.max_drop, 0, 1, include_high=False)
        at_least(option("seed"), self.seed, 0)
        one_of(option("calib_method"), self.calib_method, CALIBRATION_METHODS)
        check_training_steps(self.recipe)


INT8_OPTIONS = ("calib_method", "max_drop", "keep_float", "speed_check", "speed_device", "equalize", "equalize_relu6",
                "equalize_activations", "bias_correction", "adaround")
