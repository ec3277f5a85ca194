"""Verification: run the source model and the artifact on the same inputs and compare.

Inputs are seeded random tensors, the user's ``.npz``/``.npy`` file (arrays keyed by input
name, samples stacked on the first axis, optional ``label`` array) or a folder of images. Per output the report
gives max abs error, error relative to the largest reference magnitude, mean abs error and
cosine similarity; for classifier-shaped outputs ([batch, classes]) also top-1 agreement and,
with labels, the accuracy of both models.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InputDataError
from edgec.images import ImagePreprocess, read_image_folder
from edgec.runtime import Runner, TensorSpec

Sample = dict[str, np.ndarray]
LABEL_KEYS = ("label", "labels")
DEFAULT_RANDOM_SAMPLES = 4
# How many times the reference's own float noise an fp32/fp16 artifact may differ (Criterion):
# different kernels (XNNPACK's, approximated exp and sigmoid) move further than one runtime's
# two orders, and measured 0.37-0.43x of it on the EfficientNet-B0s of Criterion's docstring.
FLOAT_NOISE_MULTIPLE = 2.0
# ...up to this relative error: past it the reference is chaotic on the inputs (a seeded
# EfficientNet-V2-S on N(0, 1) noise moves 19% between ONNX Runtime's two orders), and a
# bound that loose would let a real lowering error through; the error message says so instead.
FLOAT_NOISE_LIMIT = 1e-2


@dataclasses.dataclass
class InputSet:
    """Batches ready to feed, with where they came from and optional labels per sample."""

    batches: list[Sample]
    source: str
    labels: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "batches": len(self.batches), "labeled": self.labels is not None}


def random_inputs(specs: Sequence[TensorSpec], seed: int = 0, count: int = DEFAULT_RANDOM_SAMPLES) -> InputSet:
    """Seeded standard-normal floats (integers in [0, 2), or below an index input's
    ``index_limit``; booleans at random) per input."""
    rng = np.random.default_rng(seed)
    batches = [{s.name: _random_array(rng, s) for s in specs} for _ in range(count)]
    indices = "".join(f"; {s.name} below {s.index_limit}" for s in specs if s.index_limit)
    return InputSet(batches, f"random (seed {seed}, {count} batches{indices})")


def _random_array(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
    shape = _static(spec)
    if np.issubdtype(spec.dtype, np.floating):
        return rng.standard_normal(shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return rng.random(shape) < 0.5
    return rng.integers(0, spec.index_limit or 2, size=shape).astype(spec.dtype)


def _static(spec: TensorSpec) -> tuple[int, ...]:
    if not all(isinstance(d, int) for d in spec.shape):
        raise InputDataError(f"Input '{spec.name}' has a dynamic shape {list(spec.shape)}; cannot make data for it.")
    return tuple(spec.shape)


def load_inputs(
    path: str | os.PathLike[str],
    specs: Sequence[TensorSpec],
    limit: int | None = None,
    images: ImagePreprocess = ImagePreprocess(),
) -> InputSet:
    """Read an ``.npz`` (keyed by input name), an ``.npy`` (single-input models), or a folder
    of images (single image-input models, preprocessed by ``images``)."""
    path = Path(path)
    arrays = read_image_folder(path, list(specs), images) if path.is_dir() else _read_arrays(path, specs)
    labels = next((np.asarray(arrays.pop(k)) for k in LABEL_KEYS if k in arrays), None)
    _check_names(arrays, specs, f"'{path}'")
    stacks = {s.name: _as_stack(arrays[s.name], s, f"'{path}'") for s in specs}
    counts = {len(v) for v in stacks.values()}
    if len(counts) != 1:
        raise InputDataError(
            f"Arrays in '{path}' hold different numbers of batches: { {k: len(v) for k, v in stacks.items()} }.",
            hint="Stack the same number of samples for every input.",
        )
    count = counts.pop()
    if labels is not None and len(labels) != count * _batch(specs[0]):
        raise InputDataError(
            f"'{path}' has {len(labels)} labels for {count * _batch(specs[0])} samples.",
            hint="Save one label per sample (a partial last batch is dropped), or no 'label' array.",
        )
    if limit is not None:
        count = min(count, limit)
        labels = None if labels is None else labels[: count * _batch(specs[0])]
    # np.asarray: a scalar input's batch would be a numpy scalar, which ONNX Runtime's calibrators pass on as it refuses
    batches = [{name: np.asarray(stack[i]) for name, stack in stacks.items()} for i in range(count)]
    return InputSet(batches, f"file {Path(path).name} ({count} batches)", labels)


def load_calibration(
    source: str | os.PathLike[str] | Callable[[], Iterable[Sample | np.ndarray]],
    specs: Sequence[TensorSpec],
    limit: int | None = None,
    images: ImagePreprocess = ImagePreprocess(),
) -> InputSet:
    """Calibration batches from a path (see ``load_inputs``) or from a callable that returns
    an iterable of samples: each a dict keyed by input name (or a bare array when the model
    has one input), shaped like the input, batch axis included. At most ``limit`` samples
    are drawn. Exceptions raised by the callable itself propagate unchanged."""
    if isinstance(source, (str, os.PathLike)):
        return load_inputs(source, specs, limit=limit, images=images)
    if not callable(source):
        raise InputDataError(
            f"A calibration source must be a path or a callable returning samples, not {type(source).__name__}.",
            hint="Pass a function instead, e.g. `lambda: samples` for a list of samples.",
        )
    name = getattr(source, "__name__", type(source).__name__)
    samples = itertools.islice(_samples_of(source, name), limit)
    batches = [_check_sample(x, specs, f"sample {i} of calibration callable '{name}'") for i, x in enumerate(samples)]
    if not batches:
        raise InputDataError(
            f"Calibration callable '{name}' returned no samples.",
            hint="Return (or yield) at least one sample; a generator can be iterated only once.",
        )
    return InputSet(batches, f"callable {name} ({len(batches)} batches)")


def _samples_of(source: Callable[[], Any], name: str) -> Iterable[Any]:
    result = source()
    if isinstance(result, (Mapping, np.ndarray, str, bytes)) or not isinstance(result, Iterable):
        raise InputDataError(
            f"Calibration callable '{name}' returned a {type(result).__name__}, not an iterable of samples.",
            hint="Return a list of samples or yield them one at a time, e.g. `yield {'input': batch}`.",
        )
    return result


def _check_sample(sample: Any, specs: Sequence[TensorSpec], where: str) -> Sample:
    """One calibration sample as a batch: every input present, shaped, typed and finite."""
    if not isinstance(sample, Mapping):
        if len(specs) != 1:
            raise InputDataError(
                f"Each sample must be a dict keyed by input name, since the model has {len(specs)} inputs; "
                f"{where} is a {type(sample).__name__}.",
                hint=f"Make each sample a dict keyed by input name: {[s.name for s in specs]}.",
            )
        sample = {specs[0].name: sample}
    _check_names(sample, specs, where)
    return {s.name: _one_batch(np.asarray(sample[s.name]), s, where) for s in specs}


def _check_names(arrays: Mapping[str, Any], specs: Sequence[TensorSpec], where: str) -> None:
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        held = sorted(map(str, arrays)) or "no arrays"
        raise InputDataError(
            f"{where[0].upper()}{where[1:]} has no array for input(s) {missing}; it holds {held}, "
            f"and the model's inputs are {_describe(specs)}.",
            hint=f"Key one array per model input by its name: {[s.name for s in specs]}.",
        )


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{s.name}' {list(s.shape)} {np.dtype(s.dtype)}" for s in specs)


def _read_arrays(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputDataError(
            f"No such inputs file or folder: '{path}'.",
            hint="Give an .npz keyed by input name, an .npy (one-input models) or a folder of images.",
        )
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.ndarray):
            return {_single_input(path, specs): data}
        with data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputDataError(
            f"Cannot read '{path}' as numpy data: {exc}.",
            hint="Save it with numpy.savez (keyed by input name) or numpy.save (one-input models).",
        ) from exc


def _single_input(path: Path, specs: Sequence[TensorSpec]) -> str:
    if len(specs) != 1:
        raise InputDataError(
            f"'{path}' holds one bare array (.npy), but the model has {len(specs)} inputs: {_describe(specs)}.",
            hint="Use an .npz keyed by input name.",
        )
    return specs[0].name


def _batch(spec: TensorSpec) -> int:
    return int(spec.shape[0]) if spec.shape and isinstance(spec.shape[0], int) else 1


def _as_stack(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Split [N, ...] samples into batches shaped like the input (dropping a partial batch)."""
    shape = _static(spec)
    _check_values(array, spec, where)
    if tuple(array.shape) == shape:
        return array[None].astype(spec.dtype)
    if not shape:  # a scalar input has no batch axis: one value per batch
        if array.ndim != 1 or not len(array):
            raise _shape_error(array, spec, where, "expected [N] (one value per batch, N ≥ 1) or a single value")
        return array.astype(spec.dtype)
    per_sample = ", ".join(map(str, shape[1:]))
    if array.ndim != len(shape) or tuple(array.shape[1:]) != shape[1:]:
        raise _shape_error(array, spec, where, f"expected [N, {per_sample}] (N samples of shape "
                           f"{list(shape[1:])}, stacked on the first axis) or exactly the input shape {list(shape)}")
    if len(array) == 0:
        raise InputDataError(
            f"Array '{spec.name}' in {where} holds zero samples (shape {list(array.shape)}); "
            f"expected [N, {per_sample}] with N ≥ 1.",
            hint="Save at least one sample per input.",
        )
    batch = shape[0]
    usable = len(array) - len(array) % batch
    if usable == 0:
        raise InputDataError(
            f"Array '{spec.name}' in {where} has {len(array)} samples, fewer than one batch of {batch}.",
            hint=f"Save at least {batch} samples (the input's batch size).",
        )
    return array[:usable].reshape((usable // batch,) + shape).astype(spec.dtype)


def _one_batch(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    shape = _static(spec)
    _check_values(array, spec, where)
    if tuple(array.shape) != shape:
        raise _shape_error(array, spec, where, f"expected exactly the input shape {list(shape)} "
                           f"(batch axis included; one sample is {list(shape[1:])})")
    return np.ascontiguousarray(array, dtype=spec.dtype)


def _shape_error(array: np.ndarray, spec: TensorSpec, where: str, expected: str) -> InputDataError:
    shape = tuple(spec.shape)
    if tuple(array.shape) == shape[1:]:
        hint = "It looks like one sample without the batch axis: add it with array[None]."
    else:
        hint = "Resize or reshape the data to the model input (check the layout, NCHW vs NHWC, and the size)."
    return InputDataError(f"Array '{spec.name}' in {where} has shape {list(array.shape)}; {expected}.", hint=hint)


def _check_values(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    """The array's dtype can feed the input without changing meaning, and floats are finite."""
    want = np.dtype(spec.dtype)
    if array.dtype.kind not in "fiub" or (array.dtype.kind == "f") != (want.kind == "f"):
        kind = "floating-point" if want.kind == "f" else "integer" if want.kind in "iu" else "boolean"
        hint = f"Convert it to {want} before saving, e.g. array.astype(np.{want.name})"
        if want.kind == "f" and array.dtype.kind in "iub":
            hint += ", after the model's preprocessing (raw 0-255 pixels usually need scaling)"
        raise InputDataError(
            f"Array '{spec.name}' in {where} has dtype {array.dtype}; input '{spec.name}' needs {kind} values ({want}).",
            hint=hint + ".",
        )
    if array.dtype.kind == "f":
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nan or inf:
            raise InputDataError(
                f"Array '{spec.name}' in {where} contains {nan} NaN and {inf} infinite value(s) out of {array.size}.",
                hint="Fix or drop those samples (often a division by zero in preprocessing); edgec uses data as given.",
            )


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When an artifact's output counts as the source's.

    fp32 artifacts must match almost exactly (max abs error relative to max |output|);
    int8 ones cannot, so they are held to a direction match (cosine) over all samples, and
    their top-1 agreement and accuracy are reported beside it.

    ``noise_floor`` is the error float arithmetic makes anyway: an output whose max abs error
    is at most that fraction of the largest |value| among all the model's outputs passes
    whatever its own scale. Without it, a near-constant head (values below 3e-7, off by
    5e-8 after a different summation order) fails at "relative error 0.17" though the
    rest of the model matches to 1e-7. The floor never exceeds ``tolerance``: above it, it
    would loosen the criterion of the model's largest output itself (and ``--tolerance 0``
    asks for an exact match).

    A nonzero ``tolerance`` also stretches to ``float_noise_multiple`` times the output's
    ``float_noise``: how far the reference itself moves when ONNX Runtime sums in another
    order (graph optimizations on instead of off); a tolerance the user chose is kept as
    given (``float_noise_multiple`` None). Deep nets of large activations move more
    than any fixed bound: a torchvision EfficientNet-B0, 30% channel-pruned, moves 1.1e-3
    between the two, and its TFLite artifact, at 4.7e-4 from the reference, is closer to it
    than ONNX Runtime's own optimized run, not wrong.
    """

    tolerance: float | None = None
    min_cosine: float | None = None
    noise_floor: float | None = None
    float_noise_multiple: float | None = FLOAT_NOISE_MULTIPLE

    @property
    def stretches(self) -> bool:
        """Whether the tolerance stretches to the reference's own float noise."""
        return bool(self.tolerance and self.float_noise_multiple)

    @property
    def floor(self) -> float | None:
        if self.noise_floor is None or self.tolerance is None:
            return self.noise_floor
        return min(self.noise_floor, self.tolerance)

    def accepts(self, c: OutputComparison, model_scale: float) -> bool:
        """``model_scale``: the largest |value| of any of the model's reference outputs."""
        if self.floor is not None and c.max_abs_error <= self.floor * model_scale:
            return True
        allowed = self.tolerance
        if self.stretches and c.float_noise:
            allowed = max(allowed, min(self.float_noise_multiple * c.float_noise, FLOAT_NOISE_LIMIT))
        within = allowed is None or c.relative_error <= allowed
        return within and (self.min_cosine is None or c.cosine >= self.min_cosine)

    def describe(self) -> str:
        parts = [f"rel err ≤ {self.tolerance:g}"] if self.tolerance is not None else []
        parts += [f"cosine ≥ {self.min_cosine:g}"] if self.min_cosine is not None else []
        text = ", ".join(parts) or "none"
        if self.floor is not None:
            text += f" (or abs err ≤ {self.floor:g} × the model's largest |output|)"
        if self.stretches:
            text += f" (or rel err ≤ {self.float_noise_multiple:g} × the reference's own float noise, up to {FLOAT_NOISE_LIMIT:g})"
        return text

    def to_dict(self) -> dict[str, float]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return data if self.stretches else {k: v for k, v in data.items() if k != "float_noise_multiple"}


@dataclasses.dataclass
class OutputComparison:
    name: str
    shape: list[int]
    max_abs_error: float
    max_abs_reference: float
    relative_error: float
    mean_abs_error: float
    cosine: float
    passed: bool
    top1_agreement: float | None = None
    accuracy_source: float | None = None
    accuracy_artifact: float | None = None
    float_noise: float | None = None  # the reference's relative error against itself summed in another order

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Verification:
    passed: bool
    criterion: Criterion
    inputs: dict[str, Any]
    source_runtime: str
    artifact_runtime: str
    outputs: list[OutputComparison]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["criterion"] = self.criterion.to_dict()
        data["outputs"] = [o.to_dict() for o in self.outputs]
        return data

    def worst(self) -> OutputComparison:
        return max(self.outputs, key=lambda o: o.relative_error)


def compare(source: Runner, artifact: Runner, inputs: InputSet, criterion: Criterion) -> Verification:
    """Run both models on every batch and compare each output."""
    _check_signatures(source, artifact)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both runtimes release the GIL while they run
        ref, got = pool.map(lambda runner: run_all(runner, inputs.batches), (source, artifact))
    noise = float_noise(source, inputs, ref) if criterion.stretches else {}
    outputs = compare_outputs(ref, got, inputs.labels, criterion, noise)
    return Verification(
        passed=all(o.passed for o in outputs),
        criterion=criterion,
        inputs=inputs.to_dict(),
        source_runtime=source.runtime,
        artifact_runtime=artifact.runtime,
        outputs=outputs,
    )


def float_noise(source: Runner, inputs: InputSet, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output, the relative error of ``source`` summed in another order against ``ref``
    (its own outputs on ``inputs``); empty where the runtime has no other order or refuses
    the model that way: the estimate may widen a criterion, never fail a build."""
    try:
        twin = source.reordered()
        other = run_all(twin, inputs.batches) if twin else {}
    except Exception:  # noqa: BLE001 - ONNX Runtime's optimizer can refuse what it runs unoptimized
        return {}
    return {name: _relative_error(ref[name], other[name]) for name in other}


def _check_signatures(source: Runner, artifact: Runner) -> None:
    for side in ("inputs", "outputs"):
        want = {s.name: tuple(s.shape) for s in getattr(source, side)}
        have = {s.name: tuple(s.shape) for s in getattr(artifact, side)}
        if set(want) != set(have):
            raise InputDataError(
                f"The artifact's {side} {sorted(have)} do not match the source model's {sorted(want)}.",
                hint="Verify an artifact against the model it was built from.",
            )


def compare_outputs(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: np.ndarray | None, criterion: Criterion,
    float_noise: Mapping[str, float] | None = None,
) -> list[OutputComparison]:
    """Compare stacked outputs (``run_all``'s) name by name; ``labels`` give accuracy;
    ``float_noise`` per output, see :class:`Criterion`."""
    scale = max((_max_abs(r.astype(np.float64)) for r in ref.values()), default=0.0)
    scale = scale if np.isfinite(scale) else 0.0  # no floor under an infinite reference
    noise = float_noise or {}
    return [_compare_output(name, ref[name], got[name], labels, criterion, scale, noise.get(name)) for name in ref]


def run_all(runner: Runner, batches: Sequence[Sample]) -> dict[str, np.ndarray]:
    """Every output of ``runner`` on every batch, stacked on a new first axis.

    A runner that may be shared between threads runs its batches on every core at once;
    each run keeps its own thread count, so the outputs are the same as one by one."""
    if runner.thread_safe and len(batches) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(len(batches), os.cpu_count() or 1)) as pool:
            results = list(pool.map(runner.run, batches))
    else:
        results = [runner.run(b) for b in batches]
    return {name: np.stack([r[name] for r in results]) for name in results[0]}


def _compare_output(name: str, ref: np.ndarray, got: np.ndarray, labels, criterion: Criterion,
                    model_scale: float, float_noise: float | None = None) -> OutputComparison:
    if ref.shape != got.shape:
        return OutputComparison(name, list(ref.shape[1:]), float("inf"), _max_abs(ref.astype(np.float64)), float("inf"),
                                float("inf"), 0.0, False)
    ref64, got64 = _finite_where_equal(ref, got)
    diff = np.abs(ref64 - got64)
    max_err = _max_error(diff, ref64, got64)
    scale = _max_abs(ref64)
    comparison = OutputComparison(
        name=name,
        shape=list(ref.shape[1:]),
        max_abs_error=max_err,
        max_abs_reference=scale,
        relative_error=max_err / scale if scale > 0 else max_err,
        mean_abs_error=float(diff.mean()) if diff.size else 0.0,
        cosine=cosine(ref64, got64),
        passed=False,
        float_noise=float_noise,
    )
    comparison.passed = criterion.accepts(comparison, model_scale)
    _add_classification(comparison, ref64, got64, labels)
    return comparison


def _max_error(diff: np.ndarray, ref64: np.ndarray, got64: np.ndarray) -> float:
    """The largest of ``diff`` (``|ref64 − got64|``); infinite where either side is not finite."""
    if not np.isfinite(got64).all() or not np.isfinite(ref64).all():
        return float("inf")
    return float(diff.max()) if diff.size else 0.0


def _finite_where_equal(ref: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64, with 0 in both where they hold the same infinity or both NaN: a masked
    attention score of -inf that the artifact also gives is a match, not an infinite error."""
    ref64, other64 = ref.astype(np.float64), other.astype(np.float64)
    same = (np.isinf(ref64) & (ref64 == other64)) | (np.isnan(ref64) & np.isnan(other64))
    if same.any():
        ref64, other64 = np.where(same, 0.0, ref64), np.where(same, 0.0, other64)
    return ref64, other64


def _relative_error(ref: np.ndarray, other: np.ndarray) -> float:
    """Max abs difference over max |ref| (the absolute difference where ref is all zero)."""
    ref64, other64 = _finite_where_equal(ref, other)
    error, scale = _max_error(np.abs(ref64 - other64), ref64, other64), _max_abs(ref64)
    return error / scale if scale > 0 else error


def _add_classification(c: OutputComparison, ref: np.ndarray, got: np.ndarray, labels) -> None:
    """Top-1 metrics for outputs shaped [batches, batch, classes]."""
    if ref.ndim != 3 or ref.shape[-1] < 2:
        return
    ref_top, got_top = ref.argmax(-1).reshape(-1), got.argmax(-1).reshape(-1)
    c.top1_agreement = float((ref_top == got_top).mean())
    if labels is not None and len(labels) == len(ref_top) and int(labels.max()) < ref.shape[-1]:
        c.accuracy_source = float((ref_top == labels).mean())
        c.accuracy_artifact = float((got_top == labels).mean())


def _max_abs(a: np.ndarray) -> float:
    return float(np.abs(a).max()) if a.size else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays as flat vectors (1 for two zero arrays)."""
    a, b = a.reshape(-1), b.reshape(-1)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    if denom == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / denom)
