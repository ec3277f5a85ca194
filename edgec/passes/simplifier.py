"""onnxsim, run in a child interpreter, for :class:`edgec.passes.canonicalize.Simplify`.

onnxsim's native code can kill the process it runs in instead of raising: a ``Shape`` whose
``start`` is past its ``end`` (one of ONNX's own node tests) segfaulted ``edgec build`` before
it had said a word. Run in a child, the crash is that child's signal and the build folds
constants the other way. The child (``edgec.child.shared``) serves every model of a process
(a search canonicalizes each candidate; the latency predictor's calibration thousands of
small models), so starting it is paid once, and a new one starts after a crash.
"""

from __future__ import annotations

import importlib.metadata

import onnx

from edgec.child import ChildCrashed, ChildError, shared
from edgec.quiet import silenced

VERSION = importlib.metadata.version("onnxsim")  # without importing it here: only the child runs it


class SimplifierFailed(Exception):
    """onnxsim raised, or crashed its process; the message says which and why."""


def simplify(proto: onnx.ModelProto, tensor_size_threshold: str) -> onnx.ModelProto:
    """``onnxsim.simplify`` (BatchNorm fusion off) in the child, or ``SimplifierFailed``."""
    try:
        simplified, _ = shared().call(_simplified, proto.SerializeToString(), tensor_size_threshold)
    except ChildCrashed as exc:
        raise SimplifierFailed(f"onnxsim crashed ({exc.signal.name if exc.signal else 'its process exited'})") from None
    except ChildError as exc:  # onnxsim fails as anything from IndexError to RuntimeError
        raise SimplifierFailed(str(exc)) from None
    return onnx.load_from_string(simplified)


def _simplified(model: bytes, tensor_size_threshold: str) -> bytes:
    """Runs in the child."""
    import onnxsim

    with silenced():  # onnxsim prints (rich in Python, iostream in C++); edgec's output is the user's
        simplified, _ = onnxsim.simplify(onnx.load_from_string(model), skip_fuse_bn=True,
                                         tensor_size_threshold=tensor_size_threshold)
    return simplified.SerializeToString()
