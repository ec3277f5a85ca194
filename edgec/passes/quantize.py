"""int8 post-training quantization on the ONNX graph (QDQ form), with sensitivity-guided
mixed precision.

ONNX Runtime's quantization tooling does the mechanics (range collectors, QDQ insertion);
edgec owns the choices: the scheme per target (``[quantize]`` in ``targets/*.toml``), which
op types have fast integer kernels, and which tensors stay float so every output keeps its
accuracy. Sensitivity is measured, not guessed: how far quantizing each activation and
weight alone moves the outputs on calibration data ranks them, then the smallest prefix of
that ranking that meets the accuracy goal is kept in float (checked with real int8 kernels).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.quantization import CalibrationMethod, QuantType
from onnxruntime.quantization.calibrate import CalibrationDataReader, TensorData, TensorsData, create_calibrator
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, load_model_with_shape_infer

from edgec.activations import activations
from edgec.errors import QuantizationError
from edgec.graph import constant
from edgec.memo import Recent, fingerprint
from edgec.passes.pipeline import PassOutcome
from edgec.passes.qdq import integer_pads
from edgec.quiet import captured_stderr
from edgec.ranges import Histogram
from edgec.runtime import Runner
from edgec.runtime.ort import OrtRunner, session_options
from edgec.verify import Criterion, InputSet, OutputComparison, compare_outputs, cosine, run_all
from edgec.weights import quantize_dequantize, weight_from_view, weight_view

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
    "mse": CalibrationMethod.MinMax,  # the bounds of the histograms edgec.ranges chooses in
}
SENSITIVITY_SAMPLES = 4  # batches the most sensitive tensors' sensitivity is measured on
COARSE_SAMPLES = 1  # batches every tensor is first measured on, to find the most sensitive
REFINED = 16  # the most sensitive tensors by the first measurement, measured again on all
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
# Ops ONNX Runtime runs in integer (QLinear*/QGemm kernels, or moves int8 data unchanged).
DEFAULT_OP_TYPES = (
    "Conv", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
    "Resize", "Pad", "Slice", "Split", "Sigmoid", "LeakyRelu",
)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a target wants int8: from the target's ``[quantize]`` table plus user overrides.

    ``reduce_range`` stores weights in 7 bits: x86 CPUs without VNNI multiply u8×s8 pairs
    with a saturating 16-bit add (vpmaddubsw), which corrupts full-range weights.
    """

    activations: str = "int8"
    weights: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    method: str = "minmax"
    percentile: float = 99.999
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES

    def __post_init__(self) -> None:
        for key in ("activations", "weights"):
            if getattr(self, key) not in _TYPES:
                raise QuantizationError(f"Quantization {key} must be one of {sorted(_TYPES)}, not {getattr(self, key)!r}.")
        if self.method not in CALIBRATION_METHODS:
            raise QuantizationError(
                f"Unknown calibration method {self.method!r}.", hint=f"Use one of {sorted(CALIBRATION_METHODS)}."
            )
        if not 0 < self.percentile <= 100:
            raise QuantizationError(f"The calibration percentile must be in (0, 100], not {self.percentile}.")

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> QuantScheme:
        """Build from a TOML table; unknown keys are an error (a typo must not be ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - fields)
        if unknown:
            raise QuantizationError(f"Unknown [quantize] keys {unknown}; allowed: {sorted(fields)}.")
        values = dict(table)
        if "op_types" in values:
            values["op_types"] = tuple(values["op_types"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["op_types"] = list(self.op_types)
        return data

    @property
    def weight_qmax(self) -> int:
        """Largest integer weight: ORT's reduced range is [-64, 64], the full one [-127, 127]."""
        return int(get_qmin_qmax_for_qType(_TYPES[self.weights].tensor_type, self.reduce_range, symmetric=True)[1])


@dataclasses.dataclass(frozen=True)
class AccuracyGoal:
    """What the int8 model must keep, measured on the calibration samples against fp32.

    ``min_cosine`` holds for every output; ``max_top1_drop`` (a fraction, 0.01 = one point)
    applies to classifier outputs when the samples are labeled.
    """

    min_cosine: float = 0.98
    max_top1_drop: float | None = None

    def met_by(self, outputs: Sequence[OutputComparison]) -> bool:
        return all(self._output_ok(o) for o in outputs)

    def _output_ok(self, o: OutputComparison) -> bool:
        if o.cosine < self.min_cosine:
            return False
        if self.max_top1_drop is None or o.accuracy_source is None:
            return True
        return o.accuracy_source - o.accuracy_artifact <= self.max_top1_drop + 1e-9


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A tensor, how far quantizing it alone moves the outputs, and the nodes kept float to spare it."""

    tensor: str
    damage: float  # 1 - lowest output cosine with only this tensor quantized
    nodes: tuple[str, ...]


# Calibration batches int8 accuracy is checked on (precision search, recovery variants): the
# checks run the artifact once per candidate, so they use a prefix, not all samples.
CHECK_BATCHES = 24


class QuantizeStatic(ir.passes.FunctionalPass):
    """Static int8 quantization to QDQ, keeping float the fewest tensors that meet ``goal``.

    ``calibration`` provides the ranges (all its batches) and the accuracy check (the first
    ``check_samples`` batches, with labels if it has them), run by ONNX Runtime at graph
    optimization level ``optimization`` — the artifact's, so the check sees its kernels.
    With ``goal=None`` everything quantizable is quantized. ``exclude`` names nodes the user
    wants kept float. The layers that produce graph outputs stay float too (unless
    ``quantize_outputs``): an output's calibrated range clips values real data go beyond —
    a detector's score logit for an object the calibration images lacked — and a float head
    costs one layer's worth of speed.
    """

    name = "quantize-int8"

    def __init__(
        self,
        calibration: InputSet,
        scheme: QuantScheme = QuantScheme(),
        goal: AccuracyGoal | None = None,
        exclude: Sequence[str] = (),
        check_samples: int = CHECK_BATCHES,
        optimization: str = "all",
        quantize_outputs: bool = False,
    ) -> None:
        super().__init__()
        if not calibration.batches:
            raise QuantizationError("int8 quantization needs at least one calibration sample.")
        self.calibration = calibration
        self.scheme = scheme
        self.goal = goal
        self.exclude = tuple(exclude)
        self.check = head(calibration, check_samples)
        self.optimization = optimization
        self.quantize_outputs = quantize_outputs

    def call(self, model: ir.Model) -> PassOutcome:
        source = ir.serde.serialize_model(model)
        _check_names(source, self.exclude)
        heads = [] if self.quantize_outputs else output_heads(source)
        ranges = calibrate(source, self.calibration.batches, self.scheme)
        shaped, always = with_shapes(source), {*self.exclude, *heads}

        def quantize(keep: set[str]) -> onnx.ModelProto:
            return to_qdq(shaped, ranges, self.scheme, sorted(keep | always))

        def runner(keep: set[str]) -> Runner:
            return OrtRunner(quantize(keep).SerializeToString(), threads=1, optimization=self.optimization)

        kept_float, steps = set(), []
        if self.goal is not None:
            reference = run_all(OrtRunner(source.SerializeToString(), threads=1, optimization="disabled"), self.check.batches)
            search = PrecisionSearch(reference, self.check, runner)
            kept_float, steps = search.run(self.goal, lambda: rank_candidates(source, ranges, self.scheme, self.check)), search.steps
        quantized = quantize(kept_float)
        details = {
            "scheme": self.scheme.to_dict(),
            "calibration_batches": len(self.calibration.batches),
            "goal": None if self.goal is None else dataclasses.asdict(self.goal),
            "output_heads": heads,
            "search": steps,
            "kept_float": sorted(kept_float),
            "quantized_ops": _count_quantized(quantized, self.scheme),
        }
        return PassOutcome(ir.serde.deserialize_model(quantized), True, details)


def head(inputs: InputSet, count: int) -> InputSet:
    """The first ``count`` batches (and their labels) of ``inputs``."""
    batches = inputs.batches[:count]
    labels = inputs.labels
    if labels is not None:
        labels = labels[: len(labels) * len(batches) // len(inputs.batches)]
    return InputSet(batches, inputs.source, labels)


def output_heads(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that produce graph outputs."""
    outputs = {o.name for o in model.graph.output}
    return sorted(n.name for n in model.graph.node if outputs & set(n.output))


def _check_names(model: onnx.ModelProto, names: Sequence[str]) -> None:
    known = {n.name for n in model.graph.node}
    unknown = sorted(set(names) - known)
    if unknown:
        raise QuantizationError(
            f"Nodes {unknown} given to keep in float are not in the model.",
            hint="Use node names as `edgec inspect` lists them (after canonicalization).",
        )


class _Reader(CalibrationDataReader):
    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


_RANGES: Recent[TensorsData] = Recent(4)


def calibrate(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], scheme: QuantScheme) -> TensorsData:
    """Activation ranges of every quantizable tensor, by the scheme's method.

    Remembered for the last few (model, samples, scheme): a build quantizes the model it
    keeps again after comparing recovery variants. Each caller gets its own copy, since ORT's
    quantizer adjusts the ranges it is given (Relu/Clip inputs take their outputs' range).
    """
    key = fingerprint(model.SerializeToString(), batches, scheme.method, scheme.percentile, scheme.op_types)
    return copy.deepcopy(_RANGES.get(key, lambda: _calibrated(model, batches, scheme)))


RANGE_SAMPLES = 32  # calibration batches histogrammed for error-minimizing ("mse") ranges


def _least_error(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], bounds: TensorsData) -> TensorsData:
    """Each tensor's range of least squared quantization error (``edgec.ranges``), searched
    within its min/max ``bounds``."""
    graph = ir.serde.deserialize_model(model).graph
    values = {v.name: v for v in graph.inputs} | {v.name: v for node in graph for v in node.outputs}
    names = [name for name in bounds if name in values]
    histograms = {name: Histogram(float(bounds[name].range_value[0]), float(bounds[name].range_value[1])) for name in names}
    for arrays in activations(ir.serde.deserialize_model(model), [values[name] for name in names], batches[:RANGE_SAMPLES]):
        for name, histogram in histograms.items():
            histogram.add(np.asarray(arrays[name]))
    chosen = {name: TensorData(**dict(zip(("lowest", "highest"), map(np.float32, h.best_range())))) for name, h in histograms.items()}
    return TensorsData(CalibrationMethod.MinMax, {**{name: bounds[name] for name in bounds}, **chosen})


def _calibrated(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], scheme: QuantScheme) -> TensorsData:
    """ORT's calibrators work on files; they live in a private temporary directory."""
    options = {"symmetric": False}
    if scheme.method == "percentile":
        options["percentile"] = scheme.percentile
    with tempfile.TemporaryDirectory(prefix="edgec-calib-") as tmp, captured_stderr():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path)
        calibrator = create_calibrator(
            path, list(scheme.op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[scheme.method], extra_options=options,
        )
        calibrator.collect_data(_Reader(batches))
        ranges = calibrator.compute_data()
    return _least_error(model, batches, ranges) if scheme.method == "mse" else ranges


def to_qdq(shaped: onnx.ModelProto, ranges: TensorsData, scheme: QuantScheme, keep_float: Sequence[str] = ()) -> onnx.ModelProto:
    """Insert QuantizeLinear/DequantizeLinear pairs around every quantizable node not kept float,
    then move the Pads between them onto the integers (``edgec.passes.qdq``).

    ``shaped`` is the model after ``with_shapes`` (ORT's quantizer needs every value's type).
    """
    model = onnx.ModelProto()
    model.CopyFrom(shaped)  # the quantizer edits its model in place
    with captured_stderr():
        quantizer = QDQQuantizer(
            model, scheme.per_channel, scheme.reduce_range, _TYPES[scheme.weights],
            _TYPES[scheme.activations], ranges, [], list(keep_float), list(scheme.op_types),
            {"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        quantizer.quantize_model()
    quantized = ir.serde.deserialize_model(quantizer.model.model)
    integer_pads(quantized)
    return ir.serde.serialize_model(quantized)


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX shape inference's value infos, the way ORT's quantizer loads it."""
    with tempfile.TemporaryDirectory(prefix="edgec-quant-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path)
        return load_model_with_shape_infer(path)


class PrecisionSearch:
    """Finds the shortest prefix of a sensitivity ranking that, kept float, meets the goal.

    Backend-independent: ``make_runner`` builds and opens the int8 artifact that keeps a
    given set of nodes float (QDQ in ONNX Runtime, or a .tflite), and ``reference`` holds
    the float model's outputs on ``check`` (``run_all``'s form).
    """

    def __init__(self, reference: dict[str, np.ndarray], check: InputSet, make_runner: Callable[[set[str]], Runner]):
        self.reference, self.check, self.make_runner = reference, check, make_runner
        self.steps: list[dict[str, Any]] = []

    def run(self, goal: AccuracyGoal, rank: Callable[[], list[Candidate]]) -> set[str]:
        """The nodes to keep float. ``rank`` is called only if the all-int8 model misses the
        goal: ranking is the expensive part, and a model that meets the goal needs none."""
        if self._passes(goal, []):
            return set()
        ranking = rank()
        good = self._first_passing(goal, ranking)
        if good is None:
            raise QuantizationError(
                f"No int8 form of this model meets the accuracy goal (cosine ≥ {goal.min_cosine:g} per output"
                f"{'' if goal.max_top1_drop is None else f', top-1 drop ≤ {goal.max_top1_drop:g}'}) even with "
                f"all {len(ranking)} sensitive tensors kept float (cosine then: {self.steps[-1]['cosine']}).",
                hint="Check the calibration data (real samples, right preprocessing), relax --min-cosine/--max-drop, or build fp32.",
            )
        return _nodes(ranking[:good])

    def _first_passing(self, goal: AccuracyGoal, ranking: list[Candidate]) -> int | None:
        """Smallest k (doubling from a guess, then bisection) such that keeping ranking[:k]
        float passes (k = 0 failed)."""
        failed, k = 0, _guess(goal, ranking)
        while failed < len(ranking):
            k = min(k, len(ranking))
            if self._passes(goal, ranking[:k]):
                return self._bisect(goal, ranking, failed, k)
            failed, k = k, 2 * k
        return None

    def _bisect(self, goal: AccuracyGoal, ranking: list[Candidate], failed: int, good: int) -> int:
        """Narrow down to within an eighth of ``good``: a few more float tensors cost less than more checks."""
        while good - failed > max(1, good // 8):
            middle = (failed + good) // 2
            if self._passes(goal, ranking[:middle]):
                good = middle
            else:
                failed = middle
        return good

    def _passes(self, goal: AccuracyGoal, kept: list[Candidate]) -> bool:
        runner = self.make_runner(_nodes(kept))
        outputs = compare_outputs(self.reference, run_all(runner, self.check.batches), self.check.labels, Criterion())
        passed = goal.met_by(outputs)
        self.steps.append({
            "kept_float_tensors": len(kept),
            "cosine": {o.name: round(o.cosine, 5) for o in outputs},
            "top1_drop": {o.name: round(o.accuracy_source - o.accuracy_artifact, 5) for o in outputs if o.accuracy_source is not None},
            "passed": passed,
        })
        return passed


def _guess(goal: AccuracyGoal, ranking: list[Candidate]) -> int:
    """Where the search starts: the shortest prefix whose float keeping leaves a summed damage
    (1 − cosine; small output errors add up roughly linearly) within the goal's. A model
    that needs 150 tensors float gets there in a few checks instead of doubling from one."""
    allowed, left = 1.0 - goal.min_cosine, sum(c.damage for c in ranking)
    for k, candidate in enumerate(ranking):
        if left <= allowed:
            return max(k, 1)
        left -= candidate.damage
    return max(len(ranking), 1)


def _nodes(candidates: Sequence[Candidate]) -> set[str]:
    return {node for c in candidates for node in c.nodes}


def rank_candidates(model: onnx.ModelProto, ranges: TensorsData, scheme: QuantScheme, samples: InputSet) -> list[Candidate]:
    """Tensors by how far quantizing each one *alone* moves the model's outputs, worst first.

    A probe copy of the model fake-quantizes every candidate behind its own switch (an If
    on a boolean graph input), so one session measures every tensor's
    end-to-end effect: AIMET's per-layer sensitivity without a model per layer. An
    activation is spared by keeping its producer and consumers float; a weight by keeping
    its layer float. Every tensor is measured on the first ``COARSE_SAMPLES`` batches of
    ``samples``; the ``REFINED`` most sensitive of them again on ``SENSITIVITY_SAMPLES``
    batches and re-sorted. The search only keeps a prefix float and checks each prefix on all
    its samples with real int8 kernels, so a rougher order costs at most a few more float tensors.
    """
    quantizable = [n for n in model.graph.node if n.op_type in scheme.op_types]
    outputs = {o.name for o in model.graph.output}
    activations = sorted({t for n in quantizable for t in [*n.input, *n.output]} & set(ranges.data) - outputs)
    weights = dict(_quantized_weights(model, scheme))
    probe = _Probe(model, {t: _activation_grid(ranges, t, scheme) for t in activations}, weights)
    names = {n.name for n in quantizable}
    spared = {t: tuple(sorted(n.name for n in quantizable if t in n.input or t in n.output)) for t in activations}
    spared.update({w: (node,) for w, (node, _) in weights.items() if node in names})
    coarse = _by_damage(probe.damages(list(spared), head(samples, COARSE_SAMPLES)), spared)
    refined = coarse[:REFINED]
    if len(samples.batches) <= COARSE_SAMPLES:
        return coarse
    return _by_damage(probe.damages([c.tensor for c in refined], head(samples, SENSITIVITY_SAMPLES)), spared) + coarse[len(refined):]


def _by_damage(damages: dict[str, float], spared: dict[str, tuple[str, ...]]) -> list[Candidate]:
    return sorted((Candidate(t, d, spared[t]) for t, d in damages.items()), key=lambda c: (-c.damage, c.tensor))


def _activation_grid(ranges: TensorsData, tensor: str, scheme: QuantScheme) -> tuple[float, np.ndarray]:
    """(scale, zero point) ORT's QDQ gives ``tensor`` from its calibrated range."""
    low, high = (float(np.asarray(v).reshape(-1)[0]) for v in ranges.data[tensor].range_value)
    dtype = np.uint8 if scheme.activations == "uint8" else np.int8
    info = np.iinfo(dtype)
    zero, scale = compute_scale_zp(np.float32(min(low, 0.0)), np.float32(max(high, 0.0)), dtype(info.min), dtype(info.max))
    return float(scale) or 1.0, np.asarray(zero, dtype)


def _quantized_weights(model: onnx.ModelProto, scheme: QuantScheme):
    """(weight name, (layer name, weight after per-channel symmetric quantize-dequantize))."""
    for node in ir.serde.deserialize_model(model).graph:
        weight = constant(node.inputs[1]) if node.op_type in WEIGHTED_OPS and len(node.inputs) > 1 else None
        if node.op_type in scheme.op_types and weight is not None:
            rounded = quantize_dequantize(weight_view(node, weight.astype(np.float64)), scheme.weight_qmax, scheme.per_channel)
            yield node.inputs[1].name, (node.name, weight_from_view(node, rounded, weight.shape).astype(weight.dtype))


class _Probe:
    """The model with a switchable quantization of each candidate tensor.

    Consumers of ``t`` read ``If(switch_t, fakequant(t), t)``; of a weight ``W``,
    ``If(switch_W, Wq, W)``. ``If`` evaluates one branch only, so a run with every switch
    off costs about what the float model does.
    """

    def __init__(self, model: onnx.ModelProto, activations: dict[str, tuple[float, np.ndarray]],
                 weights: dict[str, tuple[str, np.ndarray]]):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        self.switches: dict[str, str] = {}
        inserted: dict[str, list[onnx.NodeProto]] = {}  # after the producer of each tensor
        for tensor, (scale, zero) in activations.items():
            inserted[tensor] = self._switch(probe, tensor, _fake_quant(tensor, scale, zero))
        for tensor, (_, quantized) in weights.items():
            constant = onnx.helper.make_node("Constant", [], [f"{tensor}__q"], value=onnx.numpy_helper.from_array(quantized))
            inserted[tensor] = self._switch(probe, tensor, [constant])
        _insert_after_producers(probe.graph, inserted)
        # One thread per run, runs in parallel: deterministic, and no intra-op sync per layer.
        self.session = ort.InferenceSession(probe.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in model.graph.output]
        self.off = {name: np.zeros((), np.bool_) for name in self.switches.values()}

    def _switch(self, probe: onnx.ModelProto, tensor: str, quantized: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        """Rewire consumers of ``tensor`` to an If choosing ``quantized``'s output or ``tensor``."""
        switch, switched = f"{tensor}__switch", f"{tensor}__switched"
        for node in probe.graph.node:
            node.input[:] = [switched if name == tensor else name for name in node.input]
        probe.graph.input.append(onnx.helper.make_tensor_value_info(switch, onnx.TensorProto.BOOL, []))
        self.switches[tensor] = switch
        result = quantized[-1].output[0]
        branch = [onnx.helper.make_tensor_value_info(result, onnx.TensorProto.FLOAT, None)]  # calibrated tensors are float
        keep = onnx.helper.make_node("Identity", [tensor], [result])
        return [onnx.helper.make_node(
            "If", [switch], [switched],
            then_branch=onnx.helper.make_graph(quantized, f"{tensor}__on", [], branch),
            else_branch=onnx.helper.make_graph([keep], f"{tensor}__off", [], branch),
        )]

    def damages(self, tensors: Sequence[str], samples: InputSet) -> dict[str, float]:
        """Per tensor, 1 − the lowest output cosine over ``samples`` with only it quantized;
        the sessions' runs release the GIL, so tensors are measured on every core at once."""
        reference = self._run(samples, {})

        def damage(tensor: str) -> float:
            quantized = self._run(samples, {self.switches[tensor]: np.ones((), np.bool_)})
            return max(1.0 - cosine(a, b) for a, b in zip(reference, quantized, strict=True))

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return dict(zip(tensors, pool.map(damage, tensors), strict=True))

    def _run(self, samples: InputSet, on: dict[str, np.ndarray]) -> list[np.ndarray]:
        runs = [self.session.run(self.outputs, {**dict(batch), **self.off, **on}) for batch in samples.batches]
        return [np.concatenate([r[i].reshape(-1) for r in runs]).astype(np.float64) for i in range(len(self.outputs))]


def _fake_quant(tensor: str, scale: float, zero: np.ndarray) -> list[onnx.NodeProto]:
    """Nodes computing ``dequantize(quantize(t))`` with ``t``'s int8 grid."""
    prefix = f"{tensor}__probe"
    constants = [
        onnx.helper.make_node("Constant", [], [f"{prefix}_scale"], value=onnx.numpy_helper.from_array(np.asarray(scale, np.float32))),
        onnx.helper.make_node("Constant", [], [f"{prefix}_zero"], value=onnx.numpy_helper.from_array(zero)),
    ]
    return constants + [
        onnx.helper.make_node("QuantizeLinear", [tensor, f"{prefix}_scale", f"{prefix}_zero"], [f"{prefix}_q"]),
        onnx.helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zero"], [f"{prefix}_dq"]),
    ]


def _insert_after_producers(graph: onnx.GraphProto, inserted: dict[str, list[onnx.NodeProto]]) -> None:
    """Place each tensor's new nodes right after the node producing it (graph inputs and
    weights: first), which keeps the node list topologically sorted."""
    produced = {output for node in graph.node for output in node.output}
    ordered = [node for tensor, nodes in inserted.items() if tensor not in produced for node in nodes]
    for node in graph.node:
        ordered.append(node)
        ordered += [new for output in node.output for new in inserted.get(output, [])]
    del graph.node[:]
    graph.node.extend(ordered)


def _count_quantized(model: onnx.ModelProto, scheme: QuantScheme) -> dict[str, int]:
    """Op types of the nodes that will run in integer: input from DequantizeLinear, output
    into QuantizeLinear (the pattern ONNX Runtime fuses into its QLinear kernels), or, for
    data movement already moved onto the integers, input from QuantizeLinear."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    requantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        fused = node.input and node.input[0] in dequantized and node.output[0] in requantized
        if node.op_type in scheme.op_types and (fused or (node.input and node.input[0] in quantized)):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
