"""Magnitude pruning: zero the smallest weights of Conv/Gemm/MatMul layers.

Unstructured (any weight) at a ``sparsity`` per layer or one global magnitude threshold
across the chosen layers, or N:M (``"2:4"``: in every run of M consecutive input channels
of one output channel and kernel tap, keep the N largest), the pattern sparse tensor cores
and some NPUs accelerate. Layers with fewer than ``min_size`` weights and the first and last
layer stay dense unless chosen by name (``include``): they cost little and matter most.

What it buys on edge runtimes, measured (see the README): zeros compress, so a zipped
model shrinks; neither ONNX Runtime nor TFLite/XNNPACK runs a sparse float model faster,
and the file itself keeps its size, since both formats store dense tensors. The record
says per layer how sparse it became and the error it introduced on calibration data.

Schedules (:class:`ConstantSparsity`, :class:`PolynomialDecay`) give the sparsity for a
training step as TFMOT's do, for iterative use from the API; a build applies one step.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.activations import capture
from edgec.errors import RecipeError
from edgec.graph import attr, constant, replace_initializer_data
from edgec.passes.channel_pruning import MAX_FIT_ROWS
from edgec.passes.layers import LayerSelection, select_layers
from edgec.passes.pipeline import PassOutcome
from edgec.refit import patches
from edgec.verify import Sample
from edgec.weights import weight_from_view, weight_view

LAYER_OPS = ("Conv", "Gemm", "MatMul")
SCOPES = ("local", "global")


@dataclasses.dataclass(frozen=True)
class ConstantSparsity:
    """TFMOT's ``ConstantSparsity``: ``target`` from ``begin_step`` on, pruning every
    ``frequency`` steps until ``end_step`` (-1: never stops)."""

    target: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def sparsity(self, step: int) -> float:
        return self.target if step >= self.begin_step else 0.0

    def prunes_at(self, step: int) -> bool:
        return step >= self.begin_step and (self.end_step < 0 or step <= self.end_step) and (step - self.begin_step) % self.frequency == 0


@dataclasses.dataclass(frozen=True)
class PolynomialDecay(ConstantSparsity):
    """TFMOT's ``PolynomialDecay``: sparsity rises from ``initial`` to ``target`` between
    ``begin_step`` and ``end_step`` as ``target + (initial − target)·(1 − progress)^power``."""

    initial: float = 0.0
    power: float = 3.0

    def sparsity(self, step: int) -> float:
        if step < self.begin_step:
            return 0.0
        progress = min(1.0, (step - self.begin_step) / max(1, self.end_step - self.begin_step))
        return self.target + (self.initial - self.target) * (1 - progress) ** self.power


@dataclasses.dataclass(frozen=True)
class SparsifyOptions:
    """``sparsity`` in [0, 1) (unstructured), or ``pattern="N:M"``; ``scope="global"`` ranks
    all chosen layers' weights together."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "local"
    min_size: int = 1024
    keep_first_last: bool = True
    measure: bool = True  # the error each layer's sparsity introduces, on calibration data
    op_types: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.pattern != "unstructured":
            n, m = self.n_of_m
            if self.sparsity is not None:
                raise ValueError(f"pattern {self.pattern} fixes the sparsity at {1 - n / m:g}; drop sparsity")
        elif self.sparsity is None or not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise ValueError(f"sparsity must be a number in [0, 1), not {self.sparsity!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if not isinstance(self.min_size, int) or self.min_size < 0:
            raise ValueError(f"min_size must be a non-negative integer, not {self.min_size!r}")

    @property
    def n_of_m(self) -> tuple[int, int]:
        match = re.fullmatch(r"(\d+):(\d+)", self.pattern)
        if not match or not 0 < int(match[1]) < int(match[2]):
            raise ValueError(f"pattern must be 'unstructured' or N:M with 0 < N < M (e.g. 2:4), not {self.pattern!r}")
        return int(match[1]), int(match[2])

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(self.op_types, self.include, self.exclude)


class MagnitudeSparsity(ir.passes.InPlacePass):
    """Zero the smallest-magnitude weights of the chosen layers.

    Record: per layer ``sparsity`` reached and ``output_error`` (relative error of the
    layer's own output on calibration inputs, None without data or for grouped convs),
    ``skipped`` layers with the reason, and the overall sparsity of the chosen weights.
    """

    name = "magnitude-sparsity"

    def __init__(self, options: SparsifyOptions, batches: Sequence[Sample] = (), step: str = "sparsify"):
        self.options = options
        self.batches = list(batches)
        self.step = step

    def call(self, model: ir.Model) -> PassOutcome:
        layers, skipped = self._layers(model.graph)
        if not layers:
            raise RecipeError(f"Step '{self.step}': no layer is left to sparsify ({_reasons(skipped)}).",
                              hint="Lower min_size, or name the layers with include=[...].")
        dense = {node: constant(node.inputs[1]) for node in layers}
        sparse = self._sparse_weights(dense)
        inputs = capture(model, {node.inputs[0] for node in layers}, self.batches) if self.batches else {}
        rows = []
        for node in layers:
            rows.append({
                "layer": node.name,
                "sparsity": round(float(np.mean(sparse[node] == 0)), 4),
                "output_error": _output_error(node, dense[node], sparse[node], inputs.get(node.inputs[0].name)),
            })
            replace_initializer_data(node.inputs[1], sparse[node])
        zeros = sum(int(np.sum(w == 0)) for w in sparse.values())
        return PassOutcome(model, True, {
            "pattern": self.options.pattern,
            "scope": self.options.scope,
            "sparsity": round(zeros / sum(w.size for w in sparse.values()), 4),
            "layers": rows,
            "skipped": skipped,
        })

    def _layers(self, graph: ir.Graph) -> tuple[list[ir.Node], list[dict]]:
        candidates = [n for n in graph if n.op_type in LAYER_OPS and constant(_weight(n)) is not None]
        chosen = select_layers(candidates, self.options.selection, self.step)
        named = set(self.options.include)
        ends = {id(candidates[0]), id(candidates[-1])} if self.options.keep_first_last and candidates else set()
        kept, skipped = [], []
        for node in chosen:
            reason = self._dense_because(node, ends, bool(named))
            if reason:
                skipped.append({"layer": node.name, "reason": reason})
            else:
                kept.append(node)
        return kept, skipped

    def _dense_because(self, node: ir.Node, ends: set[int], named: bool) -> str | None:
        weight = constant(node.inputs[1])
        if len(node.inputs[1].uses()) != 1:
            return "weight shared with other nodes"
        if not named and id(node) in ends:
            return "first or last layer (keep_first_last)"
        if not named and weight.size < self.options.min_size:
            return f"fewer than min_size={self.options.min_size} weights"
        if self.options.pattern != "unstructured":
            m = self.options.n_of_m[1]
            inputs = weight_view(node, weight).shape[2]
            if inputs % m:
                return f"{inputs} input channels per group are not a multiple of {m}"
        return None

    def _sparse_weights(self, dense: dict[ir.Node, np.ndarray]) -> dict[ir.Node, np.ndarray]:
        if self.options.pattern != "unstructured":
            n, m = self.options.n_of_m
            return {node: _n_of_m(node, w, n, m) for node, w in dense.items()}
        if self.options.scope == "global":
            magnitudes = np.sort(np.concatenate([np.abs(w).ravel() for w in dense.values()]))
            count = round(self.options.sparsity * magnitudes.size)
            threshold = magnitudes[count - 1] if count else -1.0
            return {node: np.where(np.abs(w) <= threshold, 0, w).astype(w.dtype) for node, w in dense.items()}
        return {node: _smallest_zeroed(w, self.options.sparsity) for node, w in dense.items()}


def _weight(node: ir.Node) -> ir.Value | None:
    return node.inputs[1] if len(node.inputs) > 1 else None


def _reasons(skipped: list[dict]) -> str:
    reasons = sorted({s["reason"] for s in skipped})
    return "; ".join(reasons) if reasons else "no Conv/Gemm/MatMul with a constant weight"


def _smallest_zeroed(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """``weight`` with its ``sparsity`` fraction of smallest |values| set to zero (ties by position)."""
    count = round(sparsity * weight.size)
    flat = weight.ravel().copy()
    flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0
    return flat.reshape(weight.shape)


def _n_of_m(node: ir.Node, weight: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` largest of every ``m`` consecutive input channels (per output channel
    and kernel tap), along :func:`weight_view`'s input axis."""
    view = weight_view(node, weight)
    g, o, i, t = view.shape
    runs = np.moveaxis(view, 2, 3).reshape(g, o, t, i // m, m).copy()
    smallest = np.argsort(np.abs(runs), axis=-1, kind="stable")[..., : m - n]
    np.put_along_axis(runs, smallest, 0, axis=-1)
    return weight_from_view(node, np.moveaxis(runs.reshape(g, o, t, i), 3, 2), weight.shape).astype(weight.dtype)


def _output_error(node: ir.Node, dense: np.ndarray, sparse: np.ndarray, x: np.ndarray | None) -> float | None:
    """|Δoutput| / |output| of the layer alone on its calibration inputs (bias excluded)."""
    if x is None or (node.op_type == "Conv" and attr(node, "group", 1) != 1) or attr(node, "transA", 0):
        return None
    rows = patches(node, x)
    if len(rows) > MAX_FIT_ROWS:
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), MAX_FIT_ROWS, replace=False))]
    matrix = weight_view(node, dense.astype(np.float64))[0].reshape(dense.shape[0] if node.op_type == "Conv" else -1, rows.shape[1])
    delta = weight_view(node, (dense - sparse).astype(np.float64))[0].reshape(matrix.shape)
    return round(float(np.linalg.norm(rows @ delta.T) / max(np.linalg.norm(rows @ matrix.T), 1e-12)), 6)
