"""ONNX's own operator tests built by edgec: ``make bench``'s ``node_tests`` section.

The onnx wheel ships its backend conformance tests (``onnx/backend/test/data/node``: small
models, mostly of one op, each with inputs and expected outputs). Each is built for a target
with its own inputs (``--inputs``, shapes pinned to them), verified against ONNX Runtime as
every build is, and the artifact's outputs compared with ONNX's expected ones. Outcomes:

* ``matches``: built and verified, and the artifact gives ONNX's expected outputs
  (``np.allclose`` at rtol 1e-3, atol 1e-5; the largest relative deviation is recorded);
* ``differs``: built and verified, but the artifact's outputs (so ONNX Runtime's too, within
  the criterion) are not ONNX's expected ones;
* ``verification``: built, but the artifact does not match ONNX Runtime;
* ``refused``: any other ``EdgecError``: a message saying why (its class is recorded);
* ``internal``: anything else: a bug of edgec, which must say where it struck;
* ``died``: the process running the build died (a native crash), ``timeout``: it took longer
  than ``TIMEOUT_S`` and was stopped;
* ``skipped``: data the sweep cannot feed (strings, sequences, optionals).

The builds run in child interpreters (``edgec.child``), one per core, each importing
TensorFlow once and building many tests; one that dies is replaced.

    python -m edgec.bench.node_tests tflite-x86 [--only SUBSTRING ...] [-o node_tests.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.child import ChildCrashed, ChildError, ChildInterpreter

TIMEOUT_S = 300  # the slowest tests (large convolutions through TensorFlow's converter) take seconds
BAD_OUTCOMES = ("internal", "died", "timeout")  # what a sweep must never see
MODULE = "edgec.bench.node_tests"  # this module by name, also when run as ``python -m``


def node_test_dirs(only: Sequence[str] = ()) -> list[Path]:
    """The test folders of the installed onnx wheel, by name; those containing any of ``only``."""
    root = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    return sorted(d for d in root.iterdir() if d.is_dir() and (not only or any(s in d.name for s in only)))


def sweep(target: str, tests: Sequence[Path], work: Path, workers: int | None = None, precision: str | None = None) -> list[dict[str, Any]]:
    """Every test of ``tests`` built for ``target`` (one row each, in order), ``workers`` at a
    time, at ``precision`` (the target's default when None; int8 calibrates on the test's inputs)."""
    work.mkdir(parents=True, exist_ok=True)
    queue = iter(list(enumerate(tests)))
    lock, rows = threading.Lock(), [None] * len(tests)

    def drain() -> None:
        child = None
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                break
            if child is None or not child.alive():
                child = ChildInterpreter(MODULE, quiet=True)
            rows[item[0]] = _in_child(child, item[1], target, work, precision)
        if child is not None:
            child.stop()

    count = workers or min(2, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        for done in [pool.submit(drain) for _ in range(count)]:
            done.result()
    return rows


def _in_child(child: ChildInterpreter, test: Path, target: str, work: Path, precision: str | None) -> dict[str, Any]:
    timer = threading.Timer(TIMEOUT_S, child.stop)
    timer.start()
    try:
        return child.call(run_test, str(test), target, str(work), precision)[0]
    except ChildCrashed as exc:
        timed_out = not timer.is_alive()
        outcome = "timeout" if timed_out else "died"
        return {"test": test.name, "outcome": outcome, "detail": f"after {TIMEOUT_S} s" if timed_out else
                (exc.signal.name if exc.signal else "exited")}
    except ChildError as exc:  # the sweep's own code failed on this test
        return {"test": test.name, "outcome": "internal", "detail": f"in the sweep: {exc}"}
    finally:
        timer.cancel()


def run_test(test: str, target: str, work: str, precision: str | None = None) -> dict[str, Any]:
    """One test built for ``target`` under ``work`` (runs in a child; its folder is removed after)."""
    from edgec.build import BuildOptions, build
    from edgec.errors import EdgecError, VerificationError
    from edgec.runtime import open_runner

    folder, name = Path(work) / Path(test).name, Path(test).name
    row: dict[str, Any] = {"test": name}
    data = _test_data(Path(test))
    if isinstance(data, str):
        return {**row, "outcome": "skipped", "detail": data}
    inputs, expected, dynamic = data
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "inputs.npz", **inputs)
    data_file = str(folder / "inputs.npz")
    options = BuildOptions(inputs=data_file, input_shapes={k: inputs[k].shape for k in dynamic}, precision=precision,
                           calib=data_file if precision == "int8" else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = build(Path(test) / "model.onnx", target, folder / "out", options)
        got = open_runner(result.artifacts[0]).run(inputs)
        return {**row, **_against_expected(got, expected)}
    except VerificationError as exc:
        return {**row, "outcome": "verification", "detail": _first_line(exc)}
    except EdgecError as exc:
        return {**row, "outcome": "refused", "error": type(exc).__name__, "detail": _first_line(exc)}
    except Exception as exc:  # noqa: BLE001  a bug of edgec's: recorded, the sweep goes on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return {**row, "outcome": "internal", "detail": f"{type(exc).__name__}: {_first_line(exc)} "
                                                        f"({Path(where.filename).name}:{where.lineno})"}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _test_data(test: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]] | str:
    """The first data set's inputs and expected outputs by name, and the inputs whose declared
    shape is not static (pinned to the data's, as a user would with ``--input-shape``); or why
    the sweep cannot feed them."""
    model = onnx.load(test / "model.onnx", load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    data = test / "test_data_set_0"
    if any(v.type.WhichOneof("value") != "tensor_type" for v in [*inputs, *model.graph.output]):
        return "sequence or optional values"
    arrays = {}
    for prefix, values in (("input", inputs), ("output", model.graph.output)):
        for i, value in enumerate(values):
            tensor = onnx.TensorProto()
            tensor.ParseFromString((data / f"{prefix}_{i}.pb").read_bytes())
            arrays[(prefix, value.name)] = numpy_helper.to_array(tensor)
    if any(a.dtype.kind in "OSU" for a in arrays.values()):
        return "string values"
    dynamic = [v.name for v in inputs if not v.type.tensor_type.HasField("shape")
               or any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    return ({name: a for (kind, name), a in arrays.items() if kind == "input"},
            {name: a for (kind, name), a in arrays.items() if kind == "output"}, dynamic)


def _against_expected(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, Any]:
    deviation, same = 0.0, True
    for name, want in expected.items():
        have = np.asarray(got[name])
        if have.shape != want.shape:
            return {"outcome": "differs", "detail": f"output '{name}' has shape {list(have.shape)}, expected {list(want.shape)}"}
        if want.dtype.kind in "biu":
            same &= bool(np.array_equal(have, want))
            continue
        have, want = have.astype(np.float64), want.astype(np.float64)
        same &= bool(np.allclose(have, want, rtol=1e-3, atol=1e-5, equal_nan=True))
        finite = np.isfinite(want) & np.isfinite(have)
        if finite.any():
            scale = max(float(np.abs(want[finite]).max()), 1e-12)
            deviation = max(deviation, float(np.abs(have[finite] - want[finite]).max()) / scale)
    return {"outcome": "matches" if same else "differs", "max_relative_deviation": float(f"{deviation:.3g}")}


def _first_line(exc: BaseException) -> str:
    return " ".join((str(exc).strip().splitlines() or [""])[0].split())[:300]


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts per outcome, the refusals per error class, and by name every test whose outcome
    is not ``matches``, ``refused`` or ``skipped``."""
    outcomes = Counter(r["outcome"] for r in rows)
    listed = {o: sorted(r["test"] for r in rows if r["outcome"] == o) for o in ("differs", "verification", *BAD_OUTCOMES)}
    return {"tests": len(rows), "outcomes": dict(sorted(outcomes.items())),
            "refused_by_error": dict(sorted(Counter(r["error"] for r in rows if r["outcome"] == "refused").items())),
            "largest_relative_deviation": max((r["max_relative_deviation"] for r in rows if r["outcome"] == "matches"), default=None),
            **{o: names for o, names in listed.items() if names}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--only", nargs="*", default=[], help="tests whose name contains any of these")
    parser.add_argument("--precision", help="fp32, fp16 or int8 (calibrated on each test's inputs); the target's default otherwise")
    parser.add_argument("--work", default="build/node_tests")
    parser.add_argument("-o", "--output", default="build/node_tests.json")
    args = parser.parse_args(argv)
    rows = sweep(args.target, node_test_dirs(args.only), Path(args.work) / args.target, precision=args.precision)
    report = {"target": args.target, "precision": args.precision, "summary": summary(rows), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":  # pickled calls must name the module, not __main__
    from edgec.bench.node_tests import main as module_main

    raise SystemExit(module_main())
