"""ONNX Runtime lowering: an ORT-optimized ``.onnx`` and the ``.ort`` flatbuffer format.

ONNX Runtime applies its graph optimizations (fusions, constant folding, and at level "all"
its machine-specific layouts) once at build time and saves the result, so the device loads
an already-optimized graph. The ``.ort`` format is what ORT's minimal/mobile builds load.
ORT names, orders and serializes some of what it writes differently on every run;
``stable_order`` and ``stable_ort`` put both files into one canonical form.
int8 is the QDQ graph of ``edgec.passes.quantize`` in the target's scheme; ORT fuses each
DequantizeLinear → op → QuantizeLinear group into its integer kernel when it loads it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from edgec.errors import TargetError, UnsupportedOpError
from edgec.lower import Lowered, LowerOptions
from edgec.lower.stable_order import canonical
from edgec.lower.stable_ort import stable_ort
from edgec.model import to_proto
from edgec.passes.pipeline import Pipeline
from edgec.passes.quantize import QuantizeStatic
from edgec.runtime.ort import GRAPH_OPTIMIZATION_LEVELS, MISSING_OP_HINT, missing_op, session_options
from edgec.targets import Target

FORMATS = ("onnx", "ort")


def lower(model: ir.Model, target: Target, stem: str, options: LowerOptions) -> Lowered:
    level = target.runtime.get("graph_optimization", "extended")
    formats = list(target.runtime.get("formats", FORMATS))
    _check_options(target, level, formats)
    details: dict = {"graph_optimization": level, "formats": formats}
    if options.precision == "int8":
        quantize = QuantizeStatic(options.calibration, options.scheme, options.goal, options.keep_float, optimization=level,
                                  ranges=options.ranges)
        model, records = Pipeline([quantize])(model)
        details["quantization"] = records[0].details
        details["int8_coverage"] = details["quantization"].pop("int8_coverage")
    optimized = _optimized_onnx(to_proto(model), level, target, model)
    # The .ort file stores the already optimized graph as it is, so both formats are the same graph.
    saved = {"onnx": optimized, "ort": stable_ort(_save(optimized, "disabled", "ort", target, model))}
    files = {f"{stem}.{fmt}": saved[fmt] for fmt in formats}
    primary = f"{stem}.onnx" if "onnx" in formats else f"{stem}.{formats[0]}"
    return Lowered(files, primary, details)


def _check_options(target: Target, level: str, formats: list[str]) -> None:
    if level not in GRAPH_OPTIMIZATION_LEVELS:
        raise TargetError(
            f"Target '{target.name}': graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION_LEVELS)}, not {level!r}."
        )
    if not formats or set(formats) - set(FORMATS):
        raise TargetError(f"Target '{target.name}': formats must be a non-empty subset of {list(FORMATS)}, not {formats}.")


def _optimized_onnx(source: onnx.ModelProto, level: str, target: Target, model: ir.Model) -> bytes:
    """ORT's optimization of ``source`` at ``level``, saved as ONNX in a reproducible form."""
    optimized = onnx.load_from_string(_save(source.SerializeToString(), level, "onnx", target, model))
    names = {n.name for n in source.graph.node} | {v for n in source.graph.node for v in [*n.input, *n.output]}
    names |= {v.name for v in [*source.graph.input, *source.graph.output, *source.graph.initializer]}
    return canonical(optimized, names).SerializeToString()


def _save(source: bytes, level: str, fmt: str, target: Target, model: ir.Model) -> bytes:
    """Let ORT optimize the model at ``level`` and save it in ``fmt``; return the saved bytes."""
    with tempfile.TemporaryDirectory(prefix="edgec-ort-") as tmp:
        path = Path(tmp) / f"model.{fmt}"
        options = session_options(1, level)
        options.optimized_model_filepath = str(path)
        if fmt == "ort":
            options.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises NotImplemented/Fail from C++
            raise _explain(exc, target, model) from exc
        return path.read_bytes()


def _explain(exc: Exception, target: Target, model: ir.Model) -> Exception:
    """Turn ORT's session errors into messages that name the op and node."""
    missing = missing_op(exc, model.graph)
    if missing:
        op, node, reason = missing
        return UnsupportedOpError(op, node, target=target.name, reason=reason, hint=MISSING_OP_HINT)
    return TargetError(
        f"ONNX Runtime could not build the model for '{target.name}': {str(exc).strip().splitlines()[0]}"
    )
