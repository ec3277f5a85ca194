"""Where edgec was when a bug struck, and the crash report a bug report needs.

Build stages, passes and lowered nodes mark themselves with ``at(kind, name)``. A bug (any
exception but an ``EdgecError``, or an ``InternalError``) leaving such a block is tagged, at
the innermost block, with every enclosing mark, so the CLI can turn it into one message that
names the stage, the pass and the node, and write the traceback to a crash report outside the
output directory::

    with at("stage", "Lowering for tflite-arm"), at("node", "'conv1' (Conv)"):
        raise AttributeError("...")  # where(exc) == {"stage": "Lowering ...", "node": "'conv1' (Conv)"}
"""

from __future__ import annotations

import contextlib
import contextvars
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from edgec import __version__
from edgec.errors import EdgecError, InternalError

# The kinds of marks, outermost first, as the message names them.
KINDS = {"command": "{}", "stage": 'stage "{}"', "pass": "pass {}", "node": "node {}"}
_WHERE: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("edgec_where", default=())
_TAG = "_edgec_where"


@contextlib.contextmanager
def at(kind: str, name: str) -> Iterator[None]:
    """Mark the code inside as working on ``name`` (a ``kind`` of ``KINDS``)."""
    token = _WHERE.set((*_WHERE.get(), (kind, name)))
    try:
        yield
    except Exception as exc:
        if is_bug(exc) and where(exc) is None:
            with contextlib.suppress(AttributeError, TypeError):  # a few C types refuse attributes
                setattr(exc, _TAG, dict(_WHERE.get()))
        raise
    finally:
        _WHERE.reset(token)


def is_bug(exc: BaseException) -> bool:
    """Whether ``exc`` is edgec's fault: anything but an ``EdgecError``, or an ``InternalError``."""
    return not isinstance(exc, EdgecError) or isinstance(exc, InternalError)


def where(exc: BaseException) -> dict[str, str] | None:
    """The marks around the point ``exc`` was raised (innermost of each kind), if any."""
    return getattr(exc, _TAG, None)


def describe(exc: BaseException) -> str:
    """```edgec build`, stage "Lowering ...", pass channels-last, node 'conv1' (Conv)``."""
    found = where(exc) or {}
    return ", ".join(form.format(found[kind]) for kind, form in KINDS.items() if kind in found) or "an unknown step"


def bug_message(exc: BaseException, report: Path | None) -> str:
    """The one paragraph a user sees for a bug: where, what, where the report is, what to do."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    saved = (f"The crash report is {report}: please attach it (and the model, if you can share it) to a bug report."
             if report else "No crash report could be written; please report the command and the model.")
    return (f"edgec crashed in {describe(exc)}: {type(exc).__name__}: {first_line.rstrip('.')}. This is a bug in edgec, not a "
            f"problem with your model or options. {saved} Rerun with --debug to see the traceback.")


def write_report(exc: BaseException, argv: list[str] | None = None) -> Path | None:
    """Traceback, versions, command line and marks in a new ``edgec-crash-*.txt`` in the
    system's temporary folder (never the output directory, which a failed run leaves as it
    was); None if it cannot be written."""
    from edgec.report import versions

    lines = [
        f"edgec {__version__} crash report, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"command: {' '.join(argv if argv is not None else sys.argv)}",
        f"where: {describe(exc)}",
        f"python {platform.python_version()} on {platform.platform()} ({platform.machine()})",
        "versions: " + ", ".join(f"{name} {version}" for name, version in versions().items()),
        "",
        *traceback.format_exception(exc),
    ]
    try:
        with tempfile.NamedTemporaryFile("w", prefix="edgec-crash-", suffix=".txt", delete=False) as f:
            f.write("\n".join(line.rstrip("\n") for line in lines) + "\n")
        return Path(f.name)
    except OSError:
        return None
