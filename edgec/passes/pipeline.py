"""How passes are written and composed.

A pass is an ``onnx_ir`` pass (``InPlacePass`` or ``FunctionalPass``) whose ``call`` returns a
:class:`PassOutcome`: the model, whether it changed, and a small JSON-able record of what it
did (nodes folded, channels removed, ranks chosen, error introduced...). A :class:`Pipeline`
runs passes in order and keeps those records; it is the only way passes compose, so a pass
never calls another pass, the CLI or the filesystem. A pass that fails with anything but an
``EdgecError`` is a bug: the exception goes on, marked with the pass's name (``edgec.crash``).

Example::

    model, records = Pipeline([FixInputShapes({"x": (1, 3, 32, 32)}), FoldBatchNorm()])(model)
    records[1].details  # {"folded": ["bn1", "bn2"]}

A pass that did something a user should know about (a default it chose, a fallback it
took) says so in one sentence under ``details["note"]``; the pipeline raises it as an
``EdgecWarning``, and the record carries it into ``report.json``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from edgec.crash import at
from edgec.errors import EdgecWarning


@dataclasses.dataclass
class PassOutcome(ir.passes.PassResult):
    """``PassResult`` plus the record of what the pass did."""

    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did, as it appears in ``report.json``."""

    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pass_name(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", None) or type(p).__name__


# Called after each pass with (record, seconds); wall time is reported to the user as
# progress but kept out of records so reports stay deterministic.
PassObserver = Callable[[PassRecord, float], None]


class Pipeline:
    """Runs passes in order, collecting a :class:`PassRecord` per pass."""

    def __init__(self, passes: Sequence[ir.passes.PassBase], observer: PassObserver | None = None):
        self.passes = list(passes)
        self.observer = observer

    def __call__(self, model: ir.Model) -> tuple[ir.Model, list[PassRecord]]:
        records: list[PassRecord] = []
        for p in self.passes:
            before = model.graph.num_nodes()
            start = time.perf_counter()
            with at("pass", pass_name(p)):
                result = p(model)
            model = result.model
            details = result.details if isinstance(result, PassOutcome) else {}
            record = PassRecord(pass_name(p), bool(result.modified), before, model.graph.num_nodes(), details)
            records.append(record)
            if "note" in details:
                warnings.warn(details["note"], EdgecWarning, stacklevel=2)
            if self.observer:
                self.observer(record, time.perf_counter() - start)
        return model, records

