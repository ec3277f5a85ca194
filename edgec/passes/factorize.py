"""Factorization: replace a large layer by a chain of thin ones that compute nearly the same.

Per layer (Conv with ``group`` 1, Gemm, MatMul with a constant 2-D weight), three methods:

* ``svd`` — Gemm/MatMul and 1x1 Conv: truncated SVD, ``W ≈ B·A``: ``in → r → out``; the
  first layer keeps the conv's stride and pads.
* ``tucker2`` — KxK Conv: 1x1 (Cin→r1), KxK core (r1→r2, with the conv's stride, pads and
  dilations), 1x1 (r2→Cout); HOSVD of the two channel modes (Kim et al. 2016).
* ``spatial`` — KxK Conv: Kx1 (Cin→r) then 1xK (r→Cout) (Jaderberg et al. 2014): the SVD of
  the weight arranged as ``[(Cin·Kh), (Kw·Cout)]``; the vertical stride/pads/dilation go on
  the first layer, the horizontal ones on the second.

The bias stays on the last layer. Every method's result is ``W_r = B·M``: ``M`` maps an
input patch (the layer's im2col row) to the features feeding the last layer and ``B`` is
that last layer. So one error measures them all: ``ε² = tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)``, the
relative squared output error of the layer for inputs with second moment ``C`` — the
calibration patches' when data is given, the identity otherwise (then ``ε`` is the relative
weight error). "Retained energy" is ``1 − ε²``: for ``svd`` without data, the usual share
of the squared singular values kept.

**Data-aware** (calibration data): ranks are chosen with ``C`` from the original model's
inputs; ``svd`` takes the SVD of ``W·C^½`` (the best rank-r layer for those inputs),
``tucker2``/``spatial`` refit ``B`` by least squares against the original layer's outputs.
The final fit goes through the layers in graph order and uses the inputs that reach each
layer in the model factorized so far, fitted to the original layer's outputs on the
original inputs, so it also absorbs the error of the layers before it. The plain and the
data-aware factors are both measured on those rows and the better is kept, so data-aware
is never worse there.

**Rank selection.** A layer's candidates are each applicable method at ranks that are
multiples of ``round_to`` and cost fewer MACs than the layer (a layer with none is skipped).
``rank``: that rank everywhere (``auto``: svd for 1x1 and matrices, tucker2 with r1 = r2
for KxK). ``energy``: the cheapest candidate keeping that energy. ``layer_reduction``: the
most accurate candidate saving that share of the layer's MACs. ``mac_reduction``: the least
summed ``ε²`` over the layers within that share of the model's MACs: each layer takes the
option (as is, or a candidate) minimizing ``ε² + price·MACs``, with the lowest price that
meets the budget found by bisection — the greedy "least error per MAC saved", made exact on
each layer's convex hull. A first version gave every layer the same energy; it factorized
layers that save next to nothing (squeeze-excitation convs of 128 MACs) as hard as the big
ones, and at 30% fewer MACs held-out top-1 was lower on every digits model (ResNet 0.988 vs
0.992, MobileNetV3 0.970 vs 0.983, data-aware; plain fits: Keras CNN 0.213 vs 0.967).
``method=auto`` lets all applicable methods compete in each choice, so a layer gets
whichever has the lower error at the same MACs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.activations import activations
from edgec.analysis import layer_table
from edgec.errors import RecipeError
from edgec.graph import add_initializer, attr, constant, static_shape, take_name
from edgec.model import to_proto
from edgec.passes.layers import LayerSelection, select_layers
from edgec.passes.pipeline import PassOutcome
from edgec.refit import patches, ridge_solve
from edgec.verify import Sample
from edgec.weights import weight_view

METHODS = ("auto", "svd", "tucker2", "spatial")
FACTORIZED_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass(frozen=True)
class FactorizeOptions:
    """How much to factorize (exactly one of ``rank``, ``energy``, ``layer_reduction``,
    ``mac_reduction``), with which method, and on which layers."""

    method: str = "auto"
    rank: int | None = None
    energy: float | None = None
    layer_reduction: float | None = None
    mac_reduction: float | None = None
    round_to: int = 4
    data_aware: bool = True
    samples: int = 32
    op_types: Sequence[str] = ()
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()

    def __post_init__(self) -> None:
        amounts = {k: getattr(self, k) for k in ("rank", "energy", "layer_reduction", "mac_reduction")}
        given = [k for k, v in amounts.items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy, layer_reduction, mac_reduction (got {', '.join(given) or 'none'})")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank must be a positive integer, not {self.rank!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], not {self.energy}")
        for key in ("layer_reduction", "mac_reduction"):
            value = amounts[key]
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1), not {value}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, not {self.round_to!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive integer, not {self.samples!r}")

    @property
    def selection(self) -> LayerSelection:
        return LayerSelection(tuple(self.op_types), tuple(self.include), tuple(self.exclude))


# ---------------------------------------------------------------------------------------
# Layers as weights, shapes and input statistics


def _ridge(trace: float, features: int, rows: int) -> float:
    """How much of the identity is added to ``C`` (of trace ``trace``): ``max(1e-3,
    features / rows)`` of its mean eigenvalue. A layer seen on few rows per input (a
    squeeze-excitation conv at 1x1, a classifier on one row per sample) is fitted mostly to
    its weights, one seen on many mostly to its data. Without it, 24 photos fitted
    selfie_segmentation's 96-input SE convs exactly and gave them weights 25 times off."""
    return max(1e-3, features / rows) * max(trace / features, 1e-30)


@dataclasses.dataclass(frozen=True)
class InputMoments:
    """The second moment ``C`` of a layer's im2col rows plus a ridge (:func:`_ridge`):
    ``moment`` is ``C + ridge·I``, ``ridge`` the ridge itself."""

    moment: np.ndarray
    ridge: float

    @classmethod
    def of(cls, moment: np.ndarray, rows: int) -> InputMoments:
        ridge = _ridge(float(np.trace(moment)), len(moment), rows)
        return cls(moment + ridge * np.eye(len(moment)), ridge)

    @functools.cached_property
    def root(self) -> np.ndarray:
        """A square root, ``root·rootᵀ = moment``, for the whitened SVD. Any root serves:
        ``‖W·root‖`` is the error on the inputs whichever it is, and the best rank-r ``W``
        for them is ``[W·root]_r·root⁻¹``. The Cholesky factor is a tenth of the cost of
        the symmetric root's eigendecomposition (ResNet-18's 4608-feature convs: 0.3 s
        instead of 3 s each)."""
        return np.linalg.cholesky(self.moment)

    @functools.cached_property
    def inverse_root(self) -> np.ndarray:
        return np.linalg.inv(self.root)


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A layer to factorize: its weight as ``[out, in, kh, kw]`` (matrices as 1x1, Gemm's
    alpha folded in), its static input and output shapes and, with calibration data, the
    moments of its input rows. The decompositions' SVDs are computed once per layer."""

    node: ir.Node
    weight: np.ndarray
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    inputs: InputMoments | None = None
    _map_moments: dict[str, tuple[int, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict, init=False, repr=False)
    # The latest core_moments only (r_in, gram, cross), in a list since the dataclass is frozen.
    _core_moments: list[tuple[int, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list, init=False, repr=False)

    @property
    def matrix(self) -> np.ndarray:
        """``[out, in·kh·kw]``, columns in im2col order (what :func:`patches` rows hold)."""
        return self.weight.reshape(self.weight.shape[0], -1)

    @property
    def pointwise(self) -> bool:
        return self.weight.shape[2:] == (1, 1)

    @property
    def taps(self) -> int:
        return math.prod(self.weight.shape[2:])

    @property
    def positions(self) -> int:
        """Output positions: batch × spatial (or leading) dimensions."""
        return math.prod(self.y_shape) // self.weight.shape[0]

    @property
    def macs(self) -> int:
        return self.positions * self.matrix.size

    def weighted(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix·C``: a map of the patch as the calibration inputs weigh it (itself without data)."""
        return matrix if self.inputs is None else matrix @ self.inputs.moment

    @functools.cached_property
    def reference(self) -> float:
        """``tr(W·C·Wᵀ)``, the layer's squared output on the inputs: what ``ε²`` is relative to."""
        return max(float(np.sum(self.weighted(self.matrix) * self.matrix)), 1e-300)

    def feature_moments(self, method: str, ranks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``(F·C·Fᵀ, F·C·Wᵀ)`` for the features ``F`` feeding the factors' last layer.

        ``F`` is a prefix of the method's full-rank patch map ``M`` (svd, spatial: a rank-r
        map is the first rows of the full one) or a mix of one (tucker2: its core times the
        first rows of ``U_inᵀ ⊗ I``, from :meth:`core_moments`), so every candidate's error and
        refit come from :meth:`map_moments` and products no wider than ``F``, never with the ``in·kh·kw``
        features (SelecSLS-42b: 8640 and 9216)."""
        if method == "tucker2":
            r_in, r_out = ranks
            gram, cross = self.core_moments(r_in)
            return gram[:r_out, :r_out], cross[:r_out]
        return self.map_moments(method, DECOMPOSITIONS[method].map_rows(self, ranks))

    def core_moments(self, r_in: int) -> tuple[np.ndarray, np.ndarray]:
        """``(K·G·Kᵀ, K·X)`` for ``K``, the full Tucker-2 core's first ``r_in`` input channels
        (all its output channels, flattened), and ``(G, X)`` the patch map's
        :meth:`map_moments`. A core at ``(r_in, r_out)`` is ``K``'s first r_out rows, so its
        features' moments are leading blocks of these.

        The candidates come by growing ``r_in``, and each extends the last one by its new
        columns of ``K``: the products for all of them cost about one at the widest, where
        one per candidate, each as wide as its own ``r_in``, cost several times that."""
        mixing = self.full_core[:, :r_in].reshape(len(self.full_core), -1)
        gram, cross = self.map_moments("tucker2", mixing.shape[1])
        last = self._core_moments[-1] if self._core_moments and self._core_moments[-1][0] <= r_in else None
        if last is not None and last[0] == r_in:
            return last[1:]
        done = 0 if last is None else min(last[0], self.full_core.shape[1]) * self.taps  # columns of K extended
        old, new = mixing[:, :done], mixing[:, done:]
        side = old @ (gram[:done, done:] @ new.T)
        mixed_gram, mixed_cross = new @ gram[done:, done:] @ new.T + side + side.T, new @ cross[done:]
        if last is not None:
            mixed_gram, mixed_cross = mixed_gram + last[1], mixed_cross + last[2]
        self._core_moments[:] = [(r_in, mixed_gram, mixed_cross)]
        return mixed_gram, mixed_cross

    def map_moments(self, method: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``(M·C·Mᵀ, M·C·Wᵀ)`` for the first ``rows`` of the method's full-rank patch map
        ``M``: the leading blocks of the widest computed so far."""
        if self._map_moments.get(method, (0,))[0] < rows:  # rows asked for, not rows there: a map may have fewer
            self._map_moments[method] = (rows, *self._moments_of_map(method, rows))
        _, gram, cross = self._map_moments[method]
        return gram[:rows, :rows], cross[:rows]

    def _moments_of_map(self, method: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
        full = DECOMPOSITIONS[method].factor(self, DECOMPOSITIONS[method].full_ranks(self))
        filters = full.first_filters[: rows // full.repeats]
        if self.inputs is None:
            weighted = np.kron(filters, np.eye(full.repeats))  # M
        else:
            weighted = _kron_times(filters, full.repeats, self.inputs.moment)  # M·C
        return _kron_times(filters, full.repeats, weighted.T), weighted @ self.matrix.T

    def squared_error(self, last: np.ndarray, moments: tuple[np.ndarray, np.ndarray]) -> float:
        """``ε²`` of ``B·F`` from ``F``'s :meth:`feature_moments`:
        ``tr(W·C·Wᵀ) − 2·tr(B·F·C·Wᵀ) + tr(B·F·C·Fᵀ·Bᵀ)`` over the first term."""
        gram, cross = moments
        error = self.reference - 2 * float(np.sum(last * cross.T)) + float(np.sum((last @ gram) * last))
        return max(error, 0.0) / self.reference

    @functools.cached_property
    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.linalg.svd(self.matrix, full_matrices=False)

    @functools.cached_property
    def whitened_svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of ``W·root``: the weight as the calibration inputs see it."""
        return np.linalg.svd(self.matrix @ self.inputs.root, full_matrices=False)

    @functools.cached_property
    def arranged_svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SVD of the kernel as ``[(in, kh), (kw, out)]``: spatial separation's matrix."""
        out, inp, kh, kw = self.weight.shape
        return np.linalg.svd(self.weight.transpose(1, 2, 3, 0).reshape(inp * kh, kw * out), full_matrices=False)

    @functools.cached_property
    def channel_modes(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """HOSVD of the input and output channel modes: (left singular vectors, values) each."""
        out, inp = self.weight.shape[:2]
        u_in, s_in, _ = np.linalg.svd(self.weight.transpose(1, 0, 2, 3).reshape(inp, -1), full_matrices=False)
        return (u_in, s_in), self.svd[:2]

    @functools.cached_property
    def full_core(self) -> np.ndarray:
        """Tucker-2's core at full ranks: a core at ranks (r_in, r_out) is its leading block."""
        (u_in, _), (u_out, _) = self.channel_modes
        return np.einsum("oikl,or,is->rskl", self.weight, u_out, u_in, optimize=True)


def _layer(node: ir.Node) -> Layer | str:
    """The node as a :class:`Layer`, or why it cannot be factorized."""
    weight = constant(node.inputs[1])
    x_shape, y_shape = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if weight is None:
        return "weight is not a constant"
    if x_shape is None or y_shape is None:
        return "shapes are not static"
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1:
            return "grouped or depthwise convolution"
        if weight.ndim != 4:
            return "not a 2-D convolution"
        if attr(node, "auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad is set"
        return Layer(node, weight.astype(np.float64), x_shape, y_shape)
    if weight.ndim != 2:
        return "weight is not a matrix"
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return "transA is set"
    matrix = weight_view(node, weight.astype(np.float64))[0, :, :, 0] * attr(node, "alpha", 1.0)
    return Layer(node, matrix[:, :, None, None], x_shape, y_shape)


def _with_input_moments(model: ir.Model, layers: Sequence[Layer], batches: Sequence[Sample]) -> list[Layer]:
    """``layers`` with the second moment of their im2col rows over ``batches``."""
    sums = [_RowProducts(layer.matrix.shape[1]) for layer in layers]
    for values in activations(model, [layer.node.inputs[0] for layer in layers], batches):
        for total, layer in zip(sums, layers):
            total.add(patches(layer.node, values[layer.node.inputs[0].name]).astype(np.float64))
    return [dataclasses.replace(layer, inputs=total.moments()) for layer, total in zip(layers, sums)]


class _RowProducts:
    """``Σ xᵀx`` over row blocks at least as tall as they are wide: one product per block,
    not one per batch (a 8640-feature conv seen on 49 rows per sample spent most of its time
    writing an 8640² sum per sample)."""

    def __init__(self, width: int) -> None:
        self.width, self.total, self.rows, self.pending = width, np.zeros((width, width)), 0, []

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        if sum(map(len, self.pending)) >= self.width:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            block = np.concatenate(self.pending)
            self.total += block.T @ block
            self.rows += len(block)
            self.pending = []

    def moments(self) -> InputMoments:
        self._flush()
        return InputMoments.of(self.total / self.rows, self.rows)


# ---------------------------------------------------------------------------------------
# Decompositions: each gives the chain's weights as conv kernels [out, in, kh, kw]


@dataclasses.dataclass(frozen=True)
class Factors:
    """The leading layers' kernels and the last layer as a matrix ``B`` (``[out, m]``)."""

    leading: tuple[np.ndarray, ...]
    last: np.ndarray
    last_kernel: tuple[int, int]

    def kernels(self) -> list[np.ndarray]:
        out = self.last.shape[0]
        return [*self.leading, self.last.reshape(out, -1, *self.last_kernel)]

    @property
    def first_filters(self) -> np.ndarray:
        """The first layer's filters as rows: ``[r, in·kh₁·kw₁]``."""
        return self.leading[0].reshape(len(self.leading[0]), -1)

    @property
    def repeats(self) -> int:
        """At how many positions of the patch the layers after the first read its output."""
        return math.prod(self.last_kernel) * math.prod(math.prod(k.shape[2:]) for k in self.leading[1:])


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-r factors with the singular values shared evenly (balanced ranges for int8)."""
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


def _svd(layer: Layer, ranks: tuple[int, ...]) -> Factors:
    b, a = _split(*layer.svd, ranks[0])
    return Factors((a[:, :, None, None],), b, (1, 1))


def _svd_whitened(layer: Layer, ranks: tuple[int, ...]) -> Factors:
    """The best rank-r layer for the calibration inputs: the SVD of ``W·C^½``."""
    b, a = _split(*layer.whitened_svd, ranks[0])
    return Factors(((a @ layer.inputs.inverse_root)[:, :, None, None],), b, (1, 1))


def _tucker2(layer: Layer, ranks: tuple[int, ...]) -> Factors:
    r_in, r_out = ranks
    (u_in, _), (u_out, _) = layer.channel_modes
    return Factors((u_in[:, :r_in].T[:, :, None, None], layer.full_core[:r_out, :r_in]), u_out[:, :r_out], (1, 1))


def _spatial(layer: Layer, ranks: tuple[int, ...]) -> Factors:
    out, inp, kh, kw = layer.weight.shape
    r = ranks[0]
    vertical, horizontal = _split(*layer.arranged_svd, r)  # [(c,i), k] and [k, (j,o)]
    first = vertical.T.reshape(r, inp, kh, 1)
    last = horizontal.reshape(r, kw, out).transpose(2, 0, 1).reshape(out, r * kw)  # B[o, k·kw + j]
    return Factors((first,), last, (1, kw))


def _patch_map(factors: Factors) -> np.ndarray:
    """``M`` (``[m, in·kh·kw]``): what the leading layers compute from one input patch.

    The first layer's filters ``L`` are applied at every position of the patch the later
    layers read (:attr:`Factors.repeats`), so the first layer alone is ``L ⊗ I``: spatial's
    ``kh×1`` filter ``k`` at column ``j`` is feature ``(k, j)`` (svd is the 1×1, 1×1 case);
    tucker2's 1x1 runs at every tap of its core, which then mixes those features. Telling
    spatial apart by a last kernel wider than 1 missed the 7×1 convs of Inception-v3,
    whose split ends in a 1×1."""
    patch_map = np.kron(factors.first_filters, np.eye(factors.repeats))
    for kernel in factors.leading[1:]:  # tucker2's core
        patch_map = kernel.reshape(len(kernel), -1) @ patch_map
    return patch_map


def _kron_times(filters: np.ndarray, repeats: int, rows: np.ndarray) -> np.ndarray:
    """``(filters ⊗ I_repeats)·rows`` without the Kronecker product, ``repeats`` times fewer
    products: the first layer's map applied to a matrix with one row per patch feature."""
    by_position = rows.reshape(filters.shape[1], repeats, -1)
    return np.tensordot(filters, by_position, axes=1).reshape(len(filters) * repeats, -1)


@dataclasses.dataclass(frozen=True)
class Fit:
    """Factors for one (method, ranks), their ``ε²``, and with calibration data both
    candidates' ``ε²`` (``plain``, ``data_aware``); ``factors`` is the better of the two."""

    factors: Factors
    error: float
    errors: dict[str, float]


def _fit(layer: Layer, method: str, ranks: tuple[int, ...]) -> Fit:
    """Plain factors, and with data the data-aware ones (svd: whitened; others: the last
    layer refit by least squares against the original layer's outputs, from the features'
    moments: ``min ‖C^½ Fᵀ Bᵀ − C^½ Wᵀ‖``, the same as over all the calibration rows)."""
    plain = DECOMPOSITIONS[method].factor(layer, ranks)
    moments = layer.feature_moments(method, ranks)
    plain_error = layer.squared_error(plain.last, moments)
    if layer.inputs is None:
        return Fit(plain, plain_error, {})
    if method == "svd":
        aware = _svd_whitened(layer, ranks)
        aware_error = 1.0 - float(_cumulative_energy(layer.whitened_svd[1])[ranks[0] - 1])  # the SVD's tail
    else:
        gram, cross = moments
        aware = dataclasses.replace(plain, last=ridge_solve(gram, cross).T)
        aware_error = layer.squared_error(aware.last, moments)
    errors = {"plain": plain_error, "data_aware": aware_error}
    return Fit(aware if aware_error <= plain_error else plain, min(plain_error, aware_error), errors)


# ---------------------------------------------------------------------------------------
# Methods: where each applies, its candidate ranks and MACs, and how its layers are wired

MAX_TRIED_RANKS = 24  # per method and layer: rank steps widen (in multiples of round_to) beyond


def _rank_steps(full: int, step: int) -> list[int]:
    step *= max(1, math.ceil(full / (step * MAX_TRIED_RANKS)))
    return sorted({min(k, full) for k in range(step, full + step, step)})


def _cumulative_energy(values: np.ndarray) -> np.ndarray:
    energy = np.cumsum(values ** 2)
    return energy / max(energy[-1], 1e-300)


def _svd_full(layer: Layer) -> tuple[int, ...]:
    return (min(layer.matrix.shape),)


def _spatial_full(layer: Layer) -> tuple[int, ...]:
    out, inp, kh, kw = layer.weight.shape
    return (min(inp * kh, kw * out),)


def _tucker2_full(layer: Layer) -> tuple[int, ...]:
    return layer.weight.shape[1], layer.weight.shape[0]


def _single_ranks(full: Callable[[Layer], tuple[int, ...]]) -> Callable[[Layer, int], list[tuple[int, ...]]]:
    return lambda layer, step: [(r,) for r in _rank_steps(full(layer)[0], step)]


def _tucker2_ranks(layer: Layer, step: int) -> list[tuple[int, ...]]:
    """(r_in, r_out) pairs keeping the same energy in both channel modes, one pair per
    energy level at which either mode's rank steps up."""
    modes = []
    for (_, values), size in zip(layer.channel_modes, layer.weight.shape[1::-1]):
        steps = _rank_steps(size, step)
        energy = _cumulative_energy(values)  # of min(size, rest) values: beyond that, all of it
        modes.append((steps, energy[np.minimum(steps, len(energy)) - 1]))
    levels = sorted({float(e) for _, energies in modes for e in energies})
    pairs = {tuple(steps[int(np.argmax(energies >= level - 1e-12))] for steps, energies in modes) for level in levels}
    return sorted(pairs)


def _svd_macs(layer: Layer, ranks: tuple[int, ...]) -> int:
    out, inp = layer.matrix.shape
    return layer.positions * ranks[0] * (inp + out)


def _tucker2_macs(layer: Layer, ranks: tuple[int, ...]) -> int:
    out, inp, kh, kw = layer.weight.shape
    r_in, r_out = ranks
    input_positions = math.prod(layer.x_shape) // inp
    return input_positions * inp * r_in + layer.positions * (r_in * kh * kw * r_out + r_out * out)


def _spatial_macs(layer: Layer, ranks: tuple[int, ...]) -> int:
    out, inp, kh, kw = layer.weight.shape
    batch, _, _, width = layer.x_shape
    vertical_positions = batch * layer.y_shape[2] * width  # output rows × every input column
    return vertical_positions * inp * kh * ranks[0] + layer.positions * ranks[0] * kw * out


def _conv_geometry(node: ir.Node) -> dict[str, list[int]]:
    return {"strides": attr(node, "strides", [1, 1]), "pads": attr(node, "pads", [0, 0, 0, 0]),
            "dilations": attr(node, "dilations", [1, 1])}


def _svd_wiring(node: ir.Node) -> list[dict[str, list[int]]]:
    geometry = _conv_geometry(node)
    return [{"strides": geometry["strides"], "pads": geometry["pads"]}, {}]


def _tucker2_wiring(node: ir.Node) -> list[dict[str, list[int]]]:
    return [{}, _conv_geometry(node), {}]


def _spatial_wiring(node: ir.Node) -> list[dict[str, list[int]]]:
    """Vertical stride/pads/dilation on the Kx1 layer, horizontal ones on the 1xK."""
    (sh, sw), (top, left, bottom, right), (dh, dw) = _conv_geometry(node).values()
    return [{"strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]},
            {"strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}]


@dataclasses.dataclass(frozen=True)
class Method:
    applies: Callable[[Layer], bool]
    full_ranks: Callable[[Layer], tuple[int, ...]]  # exact at these ranks
    map_rows: Callable[[Layer, tuple[int, ...]], int]  # rows of the full-rank patch map the features use
    ranks: Callable[[Layer, int], list[tuple[int, ...]]]
    factor: Callable[[Layer, tuple[int, ...]], Factors]
    macs: Callable[[Layer, tuple[int, ...]], int]
    wiring: Callable[[ir.Node], list[dict[str, list[int]]]]  # conv attributes per new layer


DECOMPOSITIONS: dict[str, Method] = {
    "svd": Method(lambda layer: layer.pointwise, _svd_full, lambda layer, ranks: ranks[0], _single_ranks(_svd_full),
                  _svd, _svd_macs, _svd_wiring),
    "tucker2": Method(lambda layer: not layer.pointwise, _tucker2_full, lambda layer, ranks: ranks[0] * layer.taps,
                      _tucker2_ranks, _tucker2, _tucker2_macs, _tucker2_wiring),
    "spatial": Method(lambda layer: not layer.pointwise, _spatial_full,
                      lambda layer, ranks: ranks[0] * layer.weight.shape[3], _single_ranks(_spatial_full), _spatial,
                      _spatial_macs, _spatial_wiring),
}


# ---------------------------------------------------------------------------------------
# Rank selection


@dataclasses.dataclass(frozen=True)
class Candidate:
    method: str
    ranks: tuple[int, ...]
    macs: int
    error: float  # ε², squared relative output (or, without data, weight) error


def _methods_for(layer: Layer, method: str) -> list[str]:
    names = list(DECOMPOSITIONS) if method == "auto" else [method]
    return [m for m in names if DECOMPOSITIONS[m].applies(layer)]


def _fixed_ranks(method: str, layer: Layer, rank: int) -> tuple[int, ...]:
    return tuple(min(rank, full) for full in DECOMPOSITIONS[method].full_ranks(layer))


def _candidates(layer: Layer, settings: FactorizeOptions) -> list[Candidate]:
    """Every (method, ranks) cheaper than the layer, with its error."""
    if settings.rank is not None:
        name = "svd" if layer.pointwise else "tucker2"
        options = [(m, _fixed_ranks(m, layer, settings.rank)) for m in _methods_for(layer, settings.method)
                   if settings.method != "auto" or m == name]
    else:
        options = [(m, r) for m in _methods_for(layer, settings.method) for r in DECOMPOSITIONS[m].ranks(layer, settings.round_to)]
    affordable = [(m, r) for m, r in options if DECOMPOSITIONS[m].macs(layer, r) < layer.macs]
    widest = {}
    for method, ranks in affordable:
        widest[method] = max(widest.get(method, 0), DECOMPOSITIONS[method].map_rows(layer, ranks))
    for method, rows in widest.items():  # one product with the moments per method, at its widest candidate
        layer.map_moments(method, rows)
    return [Candidate(m, r, DECOMPOSITIONS[m].macs(layer, r), _fit(layer, m, r).error) for m, r in affordable]


def _cheapest(candidates: Sequence[Candidate], max_error: float) -> Candidate | None:
    fitting = [c for c in candidates if c.error <= max_error + 1e-12]
    return min(fitting, key=lambda c: (c.macs, c.error), default=None)


def _most_accurate(candidates: Sequence[Candidate], max_macs: float) -> Candidate | None:
    fitting = [c for c in candidates if c.macs <= max_macs]
    return min(fitting, key=lambda c: (c.error, c.macs), default=None)


def _choose(layers: Sequence[Layer], candidates: Mapping[str, list[Candidate]], settings: FactorizeOptions,
            model_macs: int) -> tuple[dict[str, Candidate | None], dict[str, Any]]:
    """The candidate per layer (None: left as is) and what the choice was."""
    if settings.rank is not None:
        return {name: (c[0] if c else None) for name, c in candidates.items()}, {"rank": settings.rank}
    if settings.energy is not None:
        return {name: _cheapest(c, 1 - settings.energy) for name, c in candidates.items()}, {"energy": settings.energy}
    if settings.layer_reduction is not None:
        macs = {layer.node.name: layer.macs for layer in layers}
        return ({name: _most_accurate(c, (1 - settings.layer_reduction) * macs[name]) for name, c in candidates.items()},
                {"layer_reduction": settings.layer_reduction})
    return _within_budget(layers, candidates, settings.mac_reduction, model_macs)


def _within_budget(layers: Sequence[Layer], candidates: Mapping[str, list[Candidate]], reduction: float,
                   model_macs: int) -> tuple[dict[str, Candidate | None], dict[str, Any]]:
    """The least summed ``ε²`` that brings the model's MACs to ``(1 − reduction)`` of
    ``model_macs``: each layer takes whichever option — left as is, or a candidate —
    minimizes ``ε² + price · MACs / model_macs``, and the lowest price meeting the budget is
    found by bisection (the MACs chosen only fall as the price rises)."""
    original = {layer.node.name: layer.macs for layer in layers}

    def choice(price: float) -> dict[str, Candidate | None]:
        chosen = {}
        for name, options in candidates.items():
            best = min(options, key=lambda c: (c.error + price * c.macs / model_macs, c.macs), default=None)
            worth = best is not None and best.error + price * best.macs / model_macs < price * original[name] / model_macs
            chosen[name] = best if worth else None
        return chosen

    def total(chosen: Mapping[str, Candidate | None]) -> int:
        return model_macs - sum(original[n] - c.macs for n, c in chosen.items() if c is not None)

    budget = (1 - reduction) * model_macs
    cheapest = {name: min(options, key=lambda c: (c.macs, c.error), default=None) for name, options in candidates.items()}
    if total(cheapest) > budget:
        raise RecipeError(
            f"Factorization cannot remove {reduction:.1%} of the model's MACs: the layers it may factorize "
            f"allow at most {1 - total(cheapest) / model_macs:.1%} (grouped/depthwise convs and other ops are left as they are).",
            hint="Ask for a smaller mac_reduction, lower round_to, or allow more layers/methods.",
        )
    low, high = 0.0, 1.0
    while total(choice(high)) > budget:
        low, high = high, 2 * high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if total(choice(middle)) <= budget else (middle, high)
    return choice(high), {"mac_reduction": reduction, "error_price": _rounded(high)}


BISECTION_STEPS = 60


# ---------------------------------------------------------------------------------------
# Graph rewrite


def _conv_output_shape(x_shape: Sequence[int], out: int, kernel: Sequence[int], wiring: Mapping[str, list[int]]) -> list[int]:
    strides, pads, dilations = (wiring.get(k, d) for k, d in (("strides", [1, 1]), ("pads", [0, 0, 0, 0]), ("dilations", [1, 1])))
    spatial = [(size + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
               for i, size in enumerate(x_shape[2:])]
    return [x_shape[0], out, *spatial]


def _conv_chain(graph: ir.Graph, layer: Layer, method: str, kernels: Sequence[np.ndarray]) -> list[ir.Node]:
    node, dtype = layer.node, constant(layer.node.inputs[1]).dtype
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    x, shape, nodes = node.inputs[0], list(layer.x_shape), []
    for i, (kernel, wiring) in enumerate(zip(kernels, DECOMPOSITIONS[method].wiring(node))):
        name = f"{node.name}_{method}{i}"
        weight = add_initializer(graph, kernel.astype(dtype), f"{name}_weight")
        inputs = [x, weight] + ([bias] if bias is not None and i == len(kernels) - 1 else [])
        attributes = {k: ir.AttrInt64s(k, v) for k, v in wiring.items()}
        new = ir.node("Conv", inputs, attributes=attributes, name=name)
        shape = _conv_output_shape(shape, kernel.shape[0], kernel.shape[2:], wiring)
        new.outputs[0].dtype, new.outputs[0].shape = x.dtype, ir.Shape(shape)
        nodes.append(new)
        x = new.outputs[0]
    return nodes


def _matrix_chain(graph: ir.Graph, layer: Layer, kernels: Sequence[np.ndarray]) -> list[ir.Node]:
    """MatMul → MatMul, or Gemm → Gemm with the bias (and beta) on the second."""
    node, dtype = layer.node, constant(layer.node.inputs[1]).dtype
    x, nodes = node.inputs[0], []
    for i, kernel in enumerate(kernels):
        name = f"{node.name}_svd{i}"
        weight = add_initializer(graph, kernel[:, :, 0, 0].T.astype(dtype), f"{name}_weight")  # [in, out]
        inputs, attributes = [x, weight], {}
        if node.op_type == "Gemm" and i == len(kernels) - 1 and len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs.append(node.inputs[2])
            attributes["beta"] = ir.AttrFloat32("beta", attr(node, "beta", 1.0))
        new = ir.node(node.op_type, inputs, attributes=attributes, name=name)
        new.outputs[0].dtype = x.dtype
        new.outputs[0].shape = ir.Shape([*layer.x_shape[:-1], kernel.shape[0]])
        nodes.append(new)
        x = new.outputs[0]
    return nodes


def _replace(graph: ir.Graph, layer: Layer, method: str, factors: Factors) -> list[str]:
    """Put the chain in the layer's place; the last output takes the layer's output name."""
    kernels = factors.kernels()
    nodes = _conv_chain(graph, layer, method, kernels) if layer.node.op_type == "Conv" else _matrix_chain(graph, layer, kernels)
    graph.insert_before(layer.node, nodes)
    old, new = layer.node.outputs[0], nodes[-1].outputs[0]
    new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    take_name(new, old, graph)
    weight = layer.node.inputs[1]
    graph.remove(layer.node, safe=True)
    if weight.is_initializer() and not weight.uses() and not weight.is_graph_output():  # unless shared
        graph.initializers.pop(weight.name)
    return [n.name for n in nodes]


# ---------------------------------------------------------------------------------------
# The pass


def _rounded(x: float) -> float:
    return float(f"{x:.4g}")


class Factorize(ir.passes.InPlacePass):
    """Low-rank factorization of the selected Conv/Gemm/MatMul layers (see the module).

    ``calibration``: samples keyed by graph input name for data-aware factors and output
    errors; None factorizes from the weights alone.

    Record: the choice (``energy``, ``rank``...), ``samples``, per factorized layer the
    ``method``, ``ranks``, ``macs`` before/after, ``weight_error`` (relative), with data the
    relative ``output_error`` of the plain and the data-aware factors (on the calibration
    rows reaching the layer in the factorized model, against the original layer's outputs)
    and which was ``kept``, the new ``nodes``; and ``skipped`` (layer → why).
    """

    name = "factorize"

    def __init__(self, settings: FactorizeOptions, calibration: Sequence[Sample] | None = None) -> None:
        self.settings = settings
        self.calibration = calibration

    def call(self, model: ir.Model) -> PassOutcome:
        layers, skipped = self._layers(model.graph)
        if self.calibration and layers:
            layers = _with_input_moments(model, layers, self.calibration)
        candidates = {layer.node.name: _candidates(layer, self.settings) for layer in layers}
        model_macs = sum(row["macs"] or 0 for row in layer_table(model.graph))
        chosen, choice = _choose(layers, candidates, self.settings, model_macs)
        for layer in layers:
            if chosen[layer.node.name] is None:
                skipped[layer.node.name] = _why_unchosen(candidates[layer.node.name])
        todo = [(layer, chosen[layer.node.name]) for layer in layers if chosen[layer.node.name] is not None]
        factorized = _factorize_in_order(model, todo, self.calibration)
        return PassOutcome(model, bool(factorized), {
            **choice,
            "method": self.settings.method,
            "samples": len(self.calibration) if self.calibration else 0,
            "layers": factorized,
            "skipped": skipped,
        })

    def _layers(self, graph: ir.Graph) -> tuple[list[Layer], dict[str, str]]:
        candidates = [n for n in graph if n.op_type in FACTORIZED_OPS and n.domain in ("", "ai.onnx")]
        layers, skipped = [], {}
        for node in select_layers(candidates, self.settings.selection, self.name):
            layer = _layer(node)
            if isinstance(layer, str):
                skipped[node.name] = layer
            elif not _methods_for(layer, self.settings.method):
                skipped[node.name] = f"method {self.settings.method} does not apply to a {'1x1' if layer.pointwise else 'KxK'} layer"
            else:
                layers.append(layer)
        return layers, skipped



def _factorize_in_order(model: ir.Model, todo: Sequence[tuple[Layer, Candidate]],
                        calibration: Sequence[Sample] | None) -> dict[str, dict[str, Any]]:
    """Replace each layer by its candidate's chain, in graph order.

    With data, each layer's final fit sees the inputs that reach it in the model as
    factorized so far and is fitted to the original layer's outputs (on the original
    inputs), so it also corrects the error the layers before it left (Zhang et al. 2016,
    "asymmetric reconstruction")."""
    original = ir.serde.deserialize_model(to_proto(model)) if calibration else None
    # The copy's nodes by position: names need not be unique.
    twin = dict(zip(map(id, model.graph), original.graph)) if original else {}
    records = {}
    for layer, candidate in todo:
        if calibration:
            reached = _rows(model, layer.node, calibration)
            wanted = _rows(original, twin[id(layer.node)], calibration) @ layer.matrix.T
            fit = _asymmetric_fit(layer, candidate, reached, wanted)
        else:
            fit = _fit(layer, candidate.method, candidate.ranks)
        records[layer.node.name] = _record(layer, candidate, fit)
        records[layer.node.name]["nodes"] = _replace(model.graph, layer, candidate.method, fit.factors)
    return records


MAX_FIT_ROWS = 65536  # im2col rows a layer is fitted on: beyond, every k-th (bounded memory)


def _rows(model: ir.Model, node: ir.Node, calibration: Sequence[Sample]) -> np.ndarray:
    """The node's input on the calibration samples as im2col rows (float64), evenly thinned
    to at most about :data:`MAX_FIT_ROWS` (the same rows for the same node and samples)."""
    value, parts = node.inputs[0], []
    for arrays in activations(model, [value], calibration):
        rows = patches(node, arrays[value.name])
        parts.append(rows[:: max(1, math.ceil(len(rows) * len(calibration) / MAX_FIT_ROWS))].astype(np.float64))
    return np.concatenate(parts)


def _asymmetric_fit(layer: Layer, candidate: Candidate, reached: np.ndarray, wanted: np.ndarray) -> Fit:
    """The candidate's plain factors, and data-aware ones fitted on the rows that reach the
    layer (svd: whitened by their moments) with the last layer refit to map them onto the
    original outputs ``wanted``, held near the weights by the same ridge as the moments
    (as if rows ``√(n·ridge)·I`` asked for ``W`` itself: added to the normal equations, since
    those rows outnumber the data's in a wide layer); ``ε²`` of both measured on the data rows."""
    method, ranks = candidate.method, candidate.ranks
    plain = DECOMPOSITIONS[method].factor(layer, ranks)
    if method == "svd":
        seen = dataclasses.replace(layer, inputs=InputMoments.of(reached.T @ reached / len(reached), len(reached)))
        start, ridge = _svd_whitened(seen, ranks), seen.inputs.ridge
    else:
        start, ridge = plain, _ridge(float(np.sum(reached ** 2)) / len(reached), reached.shape[1], len(reached))
    patch_map = _patch_map(start)
    features = reached @ patch_map.T
    prior = len(reached) * ridge
    gram = features.T @ features + prior * (patch_map @ patch_map.T)
    aware = dataclasses.replace(start, last=ridge_solve(gram, features.T @ wanted + prior * (patch_map @ layer.matrix.T)).T)
    reference = max(float(np.sum(wanted ** 2)), 1e-300)

    def squared_error(factors: Factors, features: np.ndarray) -> float:
        return float(np.sum((features @ factors.last.T - wanted) ** 2)) / reference

    plain_features = features if start is plain else reached @ _patch_map(plain).T
    errors = {"plain": squared_error(plain, plain_features), "data_aware": squared_error(aware, features)}
    return Fit(aware if errors["data_aware"] <= errors["plain"] else plain, min(errors.values()), errors)


def _record(layer: Layer, candidate: Candidate, fit: Fit) -> dict[str, Any]:
    approximation = fit.factors.last @ _patch_map(fit.factors)
    record = {
        "method": candidate.method,
        "ranks": list(candidate.ranks),
        "macs": {"before": layer.macs, "after": candidate.macs},
        "weight_error": _rounded(np.linalg.norm(layer.matrix - approximation) / max(np.linalg.norm(layer.matrix), 1e-300)),
    }
    if fit.errors:
        record["output_error"] = {k: _rounded(math.sqrt(v)) for k, v in fit.errors.items()}
        record["kept"] = min(fit.errors, key=lambda k: (fit.errors[k], k != "data_aware"))
    return record


def _why_unchosen(candidates: Sequence[Candidate]) -> str:
    if not candidates:
        return "no rank costs fewer MACs than the layer"
    return "no rank meets the energy or MAC goal with fewer MACs than the layer"
