"""int8 post-training quantization on the ONNX graph (QDQ form), with sensitivity-guided
mixed precision.

ONNX Runtime's quantization tooling does the mechanics (range collectors, QDQ insertion);
edgec owns the choices: the scheme per target (``[quantize]`` in ``targets/*.toml``), which
op types have fast integer kernels, and which tensors stay float so every output keeps its
accuracy. Sensitivity is measured, not guessed: how much keeping each activation and weight
float helps the quantized model on calibration data ranks them, and a greedy search keeps
float the most helpful ones, step by step, each step checked with real int8 kernels and
kept only if it brings the model closer to the accuracy goal.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import hashlib
import os
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgec.analysis import int8_coverage, layer_table
from edgec.activations import activations
from edgec.errors import QuantizationError
from edgec.graph import constant
from edgec.memo import Recent, fingerprint
from edgec.passes.pipeline import PassOutcome
from edgec.passes.qdq import integer_channel_padding, integer_pads
from edgec.quiet import captured_stderr
from edgec.ranges import Histogram
from edgec.runtime import Runner
from edgec.runtime.ort import OrtRunner, session_options
from edgec.verify import Criterion, InputSet, OutputComparison, compare_outputs, cosine, run_all
from edgec.weights import quantize_dequantize, weight_from_view, weight_view

# ONNX Runtime's quantization package is imported where it is used: importing it imports torch
# whenever torch is installed (through onnxruntime.tools), 3-5 s that every edgec command
# (this module comes with the targets) paid, int8 or not.
if TYPE_CHECKING:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, TensorsData

CALIBRATION_METHODS = {  # ORT's CalibrationMethod members
    "minmax": "MinMax",
    "percentile": "Percentile",
    "entropy": "Entropy",
    "mse": "MinMax",  # the bounds of the histograms edgec.ranges chooses in
}
SENSITIVITY_SAMPLES = 4  # batches the most sensitive tensors' sensitivity is measured on
COARSE_SAMPLES = 1  # batches every tensor is first measured on, to find the most sensitive
REFINED = 16  # the most sensitive tensors by the first measurement, measured again on all
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}  # ORT's QuantType members
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
        from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

        return int(get_qmin_qmax_for_qType(_quant_type(self.weights).tensor_type, self.reduce_range, symmetric=True)[1])


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

    def margin(self, outputs: Sequence[OutputComparison]) -> float:
        """How far ``outputs`` are inside the goal (negative: outside), in cosine and top-1
        fraction alike, by the output and measure that fall shortest."""
        margins = [o.cosine - self.min_cosine for o in outputs]
        if self.max_top1_drop is not None:
            margins += [self.max_top1_drop - (o.accuracy_source - o.accuracy_artifact) for o in outputs if o.accuracy_source is not None]
        return min(margins)

    def _output_ok(self, o: OutputComparison) -> bool:
        if o.cosine < self.min_cosine:
            return False
        if self.max_top1_drop is None or o.accuracy_source is None:
            return True
        return o.accuracy_source - o.accuracy_artifact <= self.max_top1_drop + 1e-9


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A tensor, how much keeping it float helps the quantized model, and the nodes kept float to spare it."""

    tensor: str
    # What sparing it is worth (``Ranking``): its damage quantized alone in the first order, then
    # the rise of the lowest output cosine when it is float too, the rest quantized.
    gain: float
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
        ranges: Sequence[tuple[str, float, float]] = (),
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
        self.ranges = tuple(ranges)

    def call(self, model: ir.Model) -> PassOutcome:
        source = ir.serde.serialize_model(model)
        _refuse_newer_opset(source, self.scheme)
        _check_names(source, self.exclude)
        heads = [] if self.quantize_outputs else output_heads(source)
        ranges, learned = with_ranges(calibrate(source, self.calibration.batches, self.scheme), self.ranges)
        shaped, always = with_shapes(source), {*self.exclude, *heads}

        def quantize(keep: set[str]) -> onnx.ModelProto:
            return to_qdq(shaped, ranges, self.scheme, sorted(keep | always))

        def artifact(keep: set[str]) -> bytes:
            return quantize(keep).SerializeToString()

        def runner(content: bytes) -> Runner:
            return OrtRunner(content, threads=1, optimization=self.optimization)

        kept_float, steps = set(), []
        if self.goal is not None:
            reference = run_all(OrtRunner(source.SerializeToString(), threads=1, optimization="disabled"), self.check.batches)
            search = PrecisionSearch(reference, self.check, artifact, runner, {row["name"]: row["macs"] for row in layer_table(model.graph)})
            ranking = functools.cache(lambda: Ranking(source, ranges, self.scheme, self.check))  # built only if it is needed
            kept_float, steps = search.run(self.goal, lambda kept: ranking()(kept)), search.steps
        quantized = quantize(kept_float)
        details = {
            "scheme": self.scheme.to_dict(),
            "calibration_batches": len(self.calibration.batches),
            **({"learned_ranges": learned} if self.ranges else {}),
            "goal": None if self.goal is None else dataclasses.asdict(self.goal),
            "output_heads": heads,
            "search": steps,
            "kept_float": sorted(kept_float),
            "quantized_ops": _count_quantized(quantized, self.scheme),
            "int8_coverage": {
                **int8_coverage(model, {n.name for n in integer_nodes(quantized, self.scheme)},
                                {**{n: "precision search" for n in kept_float}, **{n: "output head" for n in heads},
                                 **{n: "--keep-float" for n in self.exclude}}),
                "all_int8_check": steps[0] if steps else None,
            },
        }
        return PassOutcome(ir.serde.deserialize_model(quantized), True, details)


def _refuse_newer_opset(model: onnx.ModelProto, scheme: QuantScheme) -> None:
    """QDQ nodes take the model's opset, and ONNX Runtime has no QuantizeLinear kernel past
    ``LAST_QDQ_OPSET``: say so before quantizing, not as a node the user never wrote (a model
    with nothing the scheme quantizes builds as it is)."""
    if _opset(model) > LAST_QDQ_OPSET and any(node.op_type in scheme.op_types for node in model.graph.node):
        raise QuantizationError(
            f"The model uses ONNX opset {_opset(model)}; ONNX Runtime {ort.__version__} has no int8 QuantizeLinear kernel "
            f"for models past opset {LAST_QDQ_OPSET}, so an int8 ONNX Runtime artifact cannot be built from it.",
            hint=f"Build it with --precision fp32 for ONNX Runtime, build int8 for a TFLite target, or export at opset {LAST_QDQ_OPSET} or lower.",
        )


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


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, _TYPES[name])


def _reader(batches: Sequence[Mapping[str, np.ndarray]]) -> CalibrationDataReader:
    """``batches`` as the reader ORT's calibrators pull them from."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            return next(self._batches, None)

    return Reader()


_RANGES: Recent[TensorsData] = Recent(4)


def calibrate(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], scheme: QuantScheme) -> TensorsData:
    """Activation ranges of every quantizable tensor, by the scheme's method.

    Remembered for the last few (model, samples, scheme): a build quantizes the model it
    keeps again after comparing recovery variants. Each caller gets its own copy, since ORT's
    quantizer adjusts the ranges it is given (Relu/Clip inputs take their outputs' range).
    """
    key = fingerprint(model.SerializeToString(), batches, scheme.method, scheme.percentile, scheme.op_types)
    return copy.deepcopy(_RANGES.get(key, lambda: _calibrated(model, batches, scheme)))


def with_ranges(calibrated: TensorsData, ranges: Sequence[tuple[str, float, float]]) -> tuple[TensorsData, int]:
    """``calibrated`` with the ranges given (quantization-aware training's) in place of those
    calibrated for the same tensors; and how many of them it had."""
    from onnxruntime.quantization.calibrate import TensorData

    known = {name: (low, high) for name, low, high in ranges if name in calibrated.data}
    for name, (low, high) in known.items():
        calibrated.data[name] = TensorData(lowest=np.float32(low), highest=np.float32(high))
    return calibrated, len(known)


RANGE_SAMPLES = 32  # calibration batches histogrammed for error-minimizing ("mse") ranges


def _least_error(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]], bounds: TensorsData) -> TensorsData:
    """Each tensor's range of least squared quantization error (``edgec.ranges``), searched
    within its min/max ``bounds``."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

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
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    options = {"symmetric": False}
    if scheme.method == "percentile":
        options["percentile"] = scheme.percentile
    with tempfile.TemporaryDirectory(prefix="edgec-calib-") as tmp, captured_stderr():
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path)
        calibrator = create_calibrator(
            path, list(scheme.op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[scheme.method]), extra_options=options,
        )
        calibrator.collect_data(_reader(batches))
        ranges = calibrator.compute_data()
    return _least_error(model, batches, ranges) if scheme.method == "mse" else ranges


def to_qdq(shaped: onnx.ModelProto, ranges: TensorsData, scheme: QuantScheme, keep_float: Sequence[str] = ()) -> onnx.ModelProto:
    """Insert QuantizeLinear/DequantizeLinear pairs around every quantizable node not kept float,
    then move the Pads between them onto the integers and pad the input channels of Convs
    ORT's x86 int8 kernel computes wrongly (``edgec.passes.qdq``).

    ``shaped`` is the model after ``with_shapes`` (ORT's quantizer needs every value's type).
    """
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.ModelProto()
    model.CopyFrom(shaped)  # the quantizer edits its model in place
    with captured_stderr():
        quantizer = QDQQuantizer(
            model, scheme.per_channel, scheme.reduce_range, _quant_type(scheme.weights),
            _quant_type(scheme.activations), ranges, [], list(keep_float), list(scheme.op_types),
            {"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        quantizer.quantize_model()
    quantized = ir.serde.deserialize_model(quantizer.model.model)
    integer_pads(quantized)
    integer_channel_padding(quantized)
    return ir.serde.serialize_model(quantized)


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with ONNX shape inference's value infos, the way ORT's quantizer loads it."""
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    with tempfile.TemporaryDirectory(prefix="edgec-quant-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, path)
        return load_model_with_shape_infer(path)


class PrecisionSearch:
    """Greedy mixed precision, measured in the quantized model, never worse for more float.

    Each step keeps float the first candidates of ``rank``'s order, as many as their
    measured worth predicts the goal needs (``_first_guess``, ``_guess``), and is kept only
    if the real int8 artifact gets closer to the goal; else a step twice as long is tried.
    After a kept step, ``rank`` re-measures the first candidates in the quantized model with
    the float set so far. So the measured accuracy only rises along the steps kept, and the
    search stops at the first float set that meets the goal (all candidates at the latest),
    shrunk by bisection to the shortest prefix of its last step that still does. Taking
    prefixes of a ranking measured once did not hold on a DenseNet-style net: TFLite
    requantizes the inputs of a concatenation to one shared scale, and keeping 1, 2, 4...
    of the most sensitive tensors float made the cosine worse (0.977 → 0.970) until
    everything was float.

    Backend-independent: ``make_artifact`` builds the int8 artifact that keeps a given set
    of nodes float (QDQ in ONNX Runtime, or a .tflite), ``open_runner`` opens it, and
    ``reference`` holds the float model's outputs on ``check`` (``run_all``'s form).
    """

    def __init__(self, reference: dict[str, np.ndarray], check: InputSet, make_artifact: Callable[[set[str]], bytes],
                 open_runner: Callable[[bytes], Runner], macs: Mapping[str, int] | None = None):
        self.reference, self.check = reference, check
        self.make_artifact, self.open_runner = make_artifact, open_runner
        self.macs = macs or {}  # node (as candidates name them) → its MACs, for ``_lighter``
        self.steps: list[dict[str, Any]] = []
        self._checked: dict[bytes, tuple[int, list[OutputComparison]]] = {}  # artifact digest → (first check, outputs)

    def run(self, goal: AccuracyGoal, rank: Callable[[Collection[str]], list[Candidate]]) -> set[str]:
        """The nodes to keep float. ``rank(float_tensors)`` gives the candidates not yet float,
        most helpful first; it is called only if the all-int8 model misses the goal: ranking
        is the expensive part, and a model that meets the goal needs none."""
        passed, best = self._measure(goal, [])
        if passed:
            return set()
        kept: list[Candidate] = []
        ranking = rank(set())
        size = _first_guess(goal, ranking)
        while size < len(ranking) and len(self.steps) < MAX_CHECKS:
            step = ranking[:size]
            passed, score = self._measure(goal, kept + step)
            if passed:
                return self._lighter(goal, kept + step[: self._shortest(goal, kept, step)])
            if score > best:  # a step that helps is kept; the rest is re-ranked with it float
                kept, best = kept + step, score
                self.steps[-1]["taken"] = True
                ranking = rank({c.tensor for c in kept})
                size = _guess(goal, best, ranking)
            else:  # errors that only go away together (a concatenation's shared scale): a longer step
                size *= 2
        return self._everything(goal, kept, ranking)

    def _everything(self, goal: AccuracyGoal, kept: list[Candidate], rest: list[Candidate]) -> set[str]:
        """The last step (the longest, or the checks are spent): all the rest float, shrunk if that passes."""
        passed, _ = self._measure(goal, kept + rest)
        if not passed:
            raise QuantizationError(
                f"No int8 form of this model meets the accuracy goal (cosine ≥ {goal.min_cosine:g} per output"
                f"{'' if goal.max_top1_drop is None else f', top-1 drop ≤ {goal.max_top1_drop:g}'}) even with "
                f"all {len(kept) + len(rest)} sensitive tensors kept float (cosine then: {self.steps[-1]['cosine']}).",
                hint="Check the calibration data (real samples, right preprocessing), relax --min-cosine/--max-drop, or build fp32.",
            )
        return self._lighter(goal, kept + rest[: self._shortest(goal, kept, rest)])

    def _lighter(self, goal: AccuracyGoal, chosen: list[Candidate]) -> set[str]:
        """The nodes of ``chosen``, a float set that meets the goal, less the candidates it
        does without: the ones keeping the most MACs float (that no other candidate keeps
        float too) are taken back to int8 one at a time, costliest first, each kept int8 if
        the artifact still meets the goal, within ``SHED_CHECKS`` checks. The ranking orders
        by accuracy alone; on TFLite's transformer the 14th candidate made the goal and the
        13 before it kept 80% of the MACs float."""
        order = sorted((c for c in chosen if self._own_macs(c, chosen)), key=lambda c: (-self._own_macs(c, chosen), c.tensor))
        for candidate in order[:SHED_CHECKS]:
            trial = [c for c in chosen if c is not candidate]
            if self._measure(goal, trial)[0]:
                chosen = trial
                self.steps[-1]["back_to_int8"] = candidate.tensor
        return _nodes(chosen)

    def _own_macs(self, candidate: Candidate, chosen: list[Candidate]) -> int:
        """MACs only ``candidate`` keeps float among ``chosen``."""
        others = _nodes([c for c in chosen if c is not candidate])
        return sum(self.macs.get(node, 0) for node in candidate.nodes if node not in others)

    def _shortest(self, goal: AccuracyGoal, kept: list[Candidate], step: list[Candidate]) -> int:
        """The shortest prefix of ``step`` that, float with ``kept``, passes (all of it does,
        none of it does not), to within an eighth of the float set: a few more float tensors
        cost less than more checks."""
        failed, good = 0, len(step)
        while good - failed > max(1, (len(kept) + good) // 8):
            middle = (failed + good) // 2
            if self._measure(goal, kept + step[:middle])[0]:
                good = middle
            else:
                failed = middle
        return good

    def _measure(self, goal: AccuracyGoal, kept: list[Candidate]) -> tuple[bool, float]:
        """Whether the artifact keeping ``kept`` float meets the goal, and by how much
        (``goal.margin``; negative when it misses)."""
        first, outputs = self._outputs(self.make_artifact(_nodes(kept)))
        passed = goal.met_by(outputs)
        self.steps.append({
            "kept_float_tensors": len(kept),
            "cosine": {o.name: round(o.cosine, 5) for o in outputs},
            "top1_drop": {o.name: round(o.accuracy_source - o.accuracy_artifact, 5) for o in outputs if o.accuracy_source is not None},
            "passed": passed,
            **({} if first == len(self.steps) else {"same_artifact_as_check": first}),
        })
        return passed, goal.margin(outputs)

    def _outputs(self, artifact: bytes) -> tuple[int, list[OutputComparison]]:
        """The artifact's outputs compared with the reference, and the first check that ran it.
        More float nodes often give the same file (nodes whose ops are float already, or that
        the backend does not quantize); the runtimes are deterministic, so an artifact seen
        before is not run again."""
        digest = hashlib.sha256(artifact).digest()
        if digest not in self._checked:
            got = run_all(self.open_runner(artifact), self.check.batches)
            self._checked[digest] = len(self.steps), compare_outputs(self.reference, got, self.check.labels, Criterion())
        return self._checked[digest]


# Real-kernel checks a search makes before it keeps every candidate left float (the
# bisection of a passing step comes on top: a few checks).
MAX_CHECKS = 12
SHED_CHECKS = 6  # checks spent taking the costliest float candidates of a passing set back to int8


def _first_guess(goal: AccuracyGoal, ranking: list[Candidate]) -> int:
    """The first step, from damages measured alone: the shortest prefix whose float keeping
    leaves a summed damage (1 − cosine; small output errors add up roughly linearly) within
    the goal's. A model that needs 150 tensors float gets there in a few checks."""
    allowed, left = 1.0 - goal.min_cosine, sum(c.gain for c in ranking)
    for k, candidate in enumerate(ranking):
        if left <= allowed:
            return max(k, 1)
        left -= candidate.gain
    return max(len(ranking), 1)


def _guess(goal: AccuracyGoal, margin: float, ranking: list[Candidate]) -> int:
    """How many of ``ranking`` a later step takes back to float: the shortest prefix whose
    summed gains close the ``margin`` the model misses the goal by; when they do not add up
    to it (errors compound), all of them."""
    total = 0.0
    for k, candidate in enumerate(ranking, 1):
        total += max(candidate.gain, 0.0)
        if total >= -margin:
            return k
    return max(len(ranking), 1)


def _nodes(candidates: Sequence[Candidate]) -> set[str]:
    return {node for c in candidates for node in c.nodes}


class Ranking:
    """Candidates for keeping float, by how much taking each back to float helps the
    quantized model: ``ranking(float_tensors)``, most helpful first.

    A probe copy of the model fake-quantizes every candidate behind its own switch (an If
    on a boolean graph input), so one session measures the model quantized everywhere but
    where a switch says, without a model per tensor. An activation is spared by keeping its
    producer and consumers float; a weight by keeping its layer float. The first order is
    each tensor's damage quantized *alone* (every tensor on the first ``COARSE_SAMPLES``
    batches of ``samples``, the ``REFINED`` worst again on ``SENSITIVITY_SAMPLES``): cheap,
    since a run with one switch on costs what the float model does, and what found the
    large detector's 200 float tensors in a few checks. After each step the search takes,
    the ``REFINED`` first of the order are measured again *in the quantized model*: how much
    sparing each raises the cosine with every tensor quantized but those the chosen float
    nodes leave float, and re-sorted. The search checks every step with real int8 kernels,
    so a rougher order costs checks, not accuracy.
    """

    def __init__(self, model: onnx.ModelProto, ranges: TensorsData, scheme: QuantScheme, samples: InputSet):
        quantizable = [n for n in model.graph.node if n.op_type in scheme.op_types]
        outputs = {o.name for o in model.graph.output}
        activations = sorted({t for n in quantizable for t in [*n.input, *n.output]} & set(ranges.data) - outputs)
        weights = dict(_quantized_weights(model, scheme))
        self.probe = _Probe(model, {t: _activation_grid(ranges, t, scheme) for t in activations}, weights)
        names = {n.name for n in quantizable}
        self.spared = {t: tuple(sorted(n.name for n in quantizable if t in n.input or t in n.output)) for t in activations}
        self.spared.update({w: (node,) for w, (node, _) in weights.items() if node in names})
        by_node = {n.name: {t for t in [*n.input, *n.output] if t in self.probe.switches} for n in quantizable}
        self.touching = {t: {n for n, tensors in by_node.items() if t in tensors} for t in self.probe.switches}
        # A candidate is measured by turning off every tensor its nodes read or write: an optimistic
        # estimate (sparing one tensor alone measures nothing when the next, a Relu's output,
        # carries the same range), checked by the search with real kernels.
        self.floated = {t: set().union(*(by_node[n] for n in nodes)) | {t} for t, nodes in self.spared.items()}
        self.samples = samples
        self.gains: dict[str, float] | None = None  # the latest measurement of each tensor

    def __call__(self, kept: Collection[str] = ()) -> list[Candidate]:
        if self.gains is None:  # the first order: each tensor quantized alone, the rest float
            self.gains = self.probe.damages(list(self.spared), head(self.samples, COARSE_SAMPLES))
            if len(self.samples.batches) > COARSE_SAMPLES:
                self.gains.update(self.probe.damages(self._order(kept)[:REFINED], head(self.samples, SENSITIVITY_SAMPLES)))
        if kept:  # then measured in the quantized model, with the float set chosen so far
            off = self._float_tensors(set().union(*(self.spared[t] for t in kept if t in self.spared)))
            refined = {t: self.floated[t] for t in self._order(kept)[:REFINED]}
            self.gains.update(self.probe.gains(refined, head(self.samples, SENSITIVITY_SAMPLES), off))
        return [Candidate(t, self.gains[t], self.spared[t]) for t in self._order(kept)]

    def _float_tensors(self, nodes: set[str]) -> set[str]:
        """The tensors that stay float when ``nodes`` do: those only float nodes read or write
        (QDQ quantizes a tensor any int8 node touches)."""
        return {t for t, touching in self.touching.items() if touching and touching <= nodes}

    def _order(self, kept: Collection[str]) -> list[str]:
        return sorted((t for t in self.spared if t not in kept), key=lambda t: (-self.gains[t], t))


def _activation_grid(ranges: TensorsData, tensor: str, scheme: QuantScheme) -> tuple[float, np.ndarray]:
    """(scale, zero point) ORT's QDQ gives ``tensor`` from its calibrated range."""
    from onnxruntime.quantization.quant_utils import compute_scale_zp

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
        arithmetic = _opset(model) > LAST_QDQ_OPSET
        for tensor, (scale, zero) in activations.items():
            inserted[tensor] = self._switch(probe, tensor, _fake_quant(tensor, scale, zero, arithmetic))
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
        """Per tensor, 1 − the lowest output cosine over ``samples`` with only it quantized."""
        lowest = self._lowest(samples, [{t} for t in tensors], quantized=True)
        return {tensor: 1.0 - value for tensor, value in zip(tensors, lowest, strict=True)}

    def gains(self, groups: Mapping[str, Collection[str]], samples: InputSet, kept: Collection[str]) -> dict[str, float]:
        """Per group of tensors, how much the lowest output cosine over ``samples`` rises when
        its tensors are float too, with every tensor but ``kept`` quantized."""
        kept = set(kept)
        base, *spared = self._lowest(samples, [kept, *(kept | set(group) for group in groups.values())], quantized=False)
        return {name: value - base for name, value in zip(groups, spared, strict=True)}

    def _lowest(self, samples: InputSet, sets: Sequence[Collection[str]], quantized: bool) -> list[float]:
        """Per set of tensors, the lowest output cosine over ``samples`` with only those
        tensors quantized (``quantized``) or all but those; the sessions' runs release the
        GIL, so the sets are measured on every core at once."""
        reference = self._run(samples, {})

        def lowest(chosen: Collection[str]) -> float:
            got = self._run(samples, {switch: np.asarray((t in chosen) == quantized) for t, switch in self.switches.items()})
            return min(cosine(a, b) for a, b in zip(reference, got, strict=True))

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(lowest, sets))

    def _run(self, samples: InputSet, on: dict[str, np.ndarray]) -> list[np.ndarray]:
        runs = [self.session.run(self.outputs, {**dict(batch), **self.off, **on}) for batch in samples.batches]
        return [np.concatenate([r[i].reshape(-1) for r in runs]).astype(np.float64) for i in range(len(self.outputs))]


# A model's QuantizeLinear is the op's latest version at the model's opset: version 21 up to
# opset 22, version 23 from opset 23, for which ONNX Runtime 1.23 has no kernel
# ("NOT_IMPLEMENTED"). Probes of newer models quantize with arithmetic instead.
LAST_QDQ_OPSET = 22


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _fake_quant(tensor: str, scale: float, zero: np.ndarray, arithmetic: bool = False) -> list[onnx.NodeProto]:
    """Nodes computing ``dequantize(quantize(t))`` with ``t``'s int8 grid: QuantizeLinear and
    DequantizeLinear, or (``arithmetic``) what they compute, ``(clip(round(t / s) + z) − z) · s``."""
    prefix = f"{tensor}__probe"
    info = np.iinfo(zero.dtype)
    values = {"scale": np.asarray(scale, np.float32), "zero": zero}
    if arithmetic:
        values = {"scale": values["scale"], "zero": np.asarray(zero, np.float32), "low": np.float32(info.min), "high": np.float32(info.max)}
    constants = [onnx.helper.make_node("Constant", [], [f"{prefix}_{name}"], value=onnx.numpy_helper.from_array(np.asarray(value)))
                 for name, value in values.items()]
    if not arithmetic:
        return constants + [
            onnx.helper.make_node("QuantizeLinear", [tensor, f"{prefix}_scale", f"{prefix}_zero"], [f"{prefix}_q"]),
            onnx.helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zero"], [f"{prefix}_dq"]),
        ]
    steps = [("Div", [tensor, "scale"], "scaled"), ("Round", ["scaled"], "rounded"), ("Add", ["rounded", "zero"], "shifted"),
             ("Clip", ["shifted", "low", "high"], "q"), ("Sub", ["q", "zero"], "centred"), ("Mul", ["centred", "scale"], "dq")]
    return constants + [onnx.helper.make_node(op, [name if name == tensor else f"{prefix}_{name}" for name in inputs], [f"{prefix}_{out}"])
                        for op, inputs, out in steps]


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
    counts: dict[str, int] = {}
    for node in integer_nodes(model, scheme):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def integer_nodes(model: onnx.ModelProto, scheme: QuantScheme) -> list[onnx.NodeProto]:
    """The nodes of a QDQ model that will run in integer: input from DequantizeLinear, output
    into QuantizeLinear (the pattern ONNX Runtime fuses into its QLinear kernels), or, for
    data movement already moved onto the integers, input from QuantizeLinear."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    requantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return [node for node in model.graph.node if node.op_type in scheme.op_types and node.input
            and ((node.input[0] in dequantized and node.output[0] in requantized) or node.input[0] in quantized)]
