"""Run a model once in ONNX Runtime in a child process, to learn whether it crashes there.

ONNX Runtime can die on a model instead of raising an error: an integer Div by a zero of the
data traps (SIGFPE), and so does Col2Im with a zero block size (ONNX's own node tests, fed
edgec's random integers, which are 0 or 1). In edgec's process that ended the build with
"Floating point exception" and no word of what crashed. Run in a child first
(``edgec.child``), a crash is seen as the signal that ended the child, and the caller can say
what crashed and on what.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping

import numpy as np

from edgec.child import ChildCrashed, ChildError, shared
from edgec.memo import Recent, fingerprint

# A search builds many candidates of one source model in one process; each checks the same run.
_CHECKED: Recent[signal.Signals | None] = Recent(4)


def crash_signal(model: bytes | str, feeds: Mapping[str, np.ndarray], optimization: str = "disabled") -> signal.Signals | None:
    """The signal that ended ONNX Runtime running ``model`` (bytes, or a file path) on
    ``feeds`` in a child process (one thread, graph optimizations at ``optimization``), or
    None when it did not crash: it ran, or raised an error, which the caller's own run will raise."""
    key = fingerprint(model, dict(feeds), optimization)
    return _CHECKED.get(key, lambda: _run_in_child(model, dict(feeds), optimization))


def _run_in_child(model: bytes | str, feeds: dict[str, np.ndarray], optimization: str) -> signal.Signals | None:
    try:
        shared().call(_run_once, model, feeds, optimization)
    except ChildCrashed as exc:
        return exc.signal
    except ChildError:
        pass
    return None


def _run_once(model: bytes | str, feeds: dict[str, np.ndarray], optimization: str) -> None:
    """Runs in the child."""
    from edgec.runtime.ort import OrtRunner  # only the child needs ONNX Runtime here

    OrtRunner(model, threads=1, optimization=optimization).run(feeds)
