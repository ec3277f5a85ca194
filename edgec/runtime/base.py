"""The one interface every runtime runner offers.

Callers speak the *source model's* language: input and output names and layouts as in the
ONNX file the user gave. A runner translates (e.g. NCHW → NHWC for a TFLite artifact whose
inputs edgec moved to channels-last) so no caller ever thinks about layout.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping

import numpy as np

from edgec.errors import InputDataError


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the source model sees it."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype
    # An integer input that indexes a table (token ids into an embedding): its values are < this.
    index_limit: int | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


class Runner(abc.ABC):
    """Runs one model file on one runtime with numpy inputs and outputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    runtime: str
    thread_safe = False  # whether several threads may call ``run`` at once

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run with already-validated feeds in the source layout."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array of the input's shape."""
        return self._run(self._checked(feeds))

    def reordered(self) -> Runner | None:
        """The same model computed in another float32 summation order, or None where this
        runtime has no second one: how far float arithmetic alone moves the outputs."""
        return None

    def _checked(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise InputDataError(
                f"No data for input(s) {missing}; the model's inputs are {[s.name for s in self.inputs]}."
            )
        checked = {}
        for spec in self.inputs:
            array = np.asarray(feeds[spec.name])
            static = all(isinstance(d, int) for d in spec.shape)
            if static and tuple(array.shape) != tuple(spec.shape):
                raise InputDataError(
                    f"Input '{spec.name}' expects shape {list(spec.shape)}, got {list(array.shape)}."
                )
            checked[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
        return checked
