"""Run a model once in ONNX Runtime in a child process, to learn whether it crashes there.

ONNX Runtime can die on a model instead of raising an error: an integer Div by a zero of the
data traps (SIGFPE), and so does Col2Im with a zero block size (ONNX's own node tests, fed
edgec's random integers, which are 0 or 1). In edgec's process that ended the build with
"Floating point exception" and no word of what crashed. Run in a child first, a crash is
seen as the signal that ended the child, and the caller can say what crashed and on what.

    python -m edgec.runtime.isolated < payload.npz   (the model and the feeds, see ``crash_signal``)
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Mapping

import numpy as np

from edgec.memo import Recent, fingerprint

MODEL_KEY = "model"
PATH_KEY = "path"
INPUT_PREFIX = "input:"

# A search builds many candidates of one source model in one process; each checks the same run.
_CHECKED: Recent[signal.Signals | None] = Recent(4)


def crash_signal(model: bytes | str, feeds: Mapping[str, np.ndarray], optimization: str = "disabled") -> signal.Signals | None:
    """The signal that ended ONNX Runtime running ``model`` (bytes, or a file path) on
    ``feeds`` in a child process (one thread, graph optimizations at ``optimization``), or
    None when it did not crash: it ran, or raised an error, which the caller's own run will raise."""
    key = fingerprint(model, dict(feeds), optimization)
    return _CHECKED.get(key, lambda: _run_child(_payload(model, feeds), optimization))


def _payload(model: bytes | str, feeds: Mapping[str, np.ndarray]) -> bytes:
    arrays = {INPUT_PREFIX + name: np.asarray(value) for name, value in feeds.items()}
    if isinstance(model, bytes):
        arrays[MODEL_KEY] = np.frombuffer(model, dtype=np.uint8)
    else:
        arrays[PATH_KEY] = np.array(str(model))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _run_child(payload: bytes, optimization: str) -> signal.Signals | None:
    done = subprocess.run([sys.executable, "-m", __name__, optimization], input=payload, capture_output=True)
    return signal.Signals(-done.returncode) if done.returncode < 0 else None


def main() -> int:
    from edgec.runtime.ort import OrtRunner  # only the child needs ONNX Runtime here

    data = np.load(io.BytesIO(sys.stdin.buffer.read()))
    model = data[MODEL_KEY].tobytes() if MODEL_KEY in data.files else str(data[PATH_KEY])
    feeds = {key[len(INPUT_PREFIX):]: data[key] for key in data.files if key.startswith(INPUT_PREFIX)}
    OrtRunner(model, threads=1, optimization=sys.argv[1]).run(feeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
