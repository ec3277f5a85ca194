"""A child Python interpreter that runs edgec's module-level functions, one call at a time.

Its uses: work started ahead on the second core (``edgec.lower.ahead``), and work that can
kill the process it runs in instead of raising (onnxsim segfaults on a ``Shape`` whose start
is past its end; a build in ``edgec.bench.node_tests``): run there, a crash is the child's
signal, which the caller turns into a message, a fallback or a recorded outcome, and edgec
lives on.

It is a Python process running ``serve``, fed pickled calls on its stdin, not a
``multiprocessing`` child: those import the caller's main module again, which runs a user's
unguarded build script a second time.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ChildError(Exception):
    """The call raised in the child; the message is its ``Type: message``."""


class ChildCrashed(Exception):
    """The child died during the call, by ``signal`` when native code crashed (None: it exited)."""

    def __init__(self, signal_: signal.Signals | None):
        super().__init__(f"the child process died ({signal_.name if signal_ else 'exited'})")
        self.signal = signal_


class ChildInterpreter:
    """A child interpreter importing module ``preload`` at start, running the calls it is sent
    in order; ``quiet``: what it writes to stderr (native libraries' chatter) is dropped."""

    def __init__(self, preload: str, quiet: bool = False):
        paths = [str(Path(__file__).resolve().parents[1]), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this edgec, whatever put it on sys.path
        serve_ = f"from {__name__} import serve; serve({preload!r})"
        self.process = subprocess.Popen([sys.executable, "-c", serve_], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL if quiet else None, env=env)
        self._lock = threading.Lock()

    def call(self, function: Callable[..., Any], *args: Any) -> tuple[Any, list[Warning]]:
        """``function(*args)`` (module-level; arguments and result pickled) run in the child:
        its result and the warnings it gave. Raises ``ChildError`` when it raised there, and
        ``ChildCrashed`` when the child died (it is of no further use then)."""
        with self._lock:
            try:
                pickle.dump((function, args), self.process.stdin)
                self.process.stdin.flush()
                ok, result, warned = pickle.load(self.process.stdout)
            except (EOFError, BrokenPipeError, pickle.UnpicklingError):
                code = self.process.wait()
                raise ChildCrashed(signal.Signals(-code) if code < 0 else None) from None
        if not ok:
            raise ChildError(result)
        return result, warned

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


_shared: ChildInterpreter | None = None
_sharing = threading.Lock()


def shared() -> ChildInterpreter:
    """This process's one child for work that may crash: started on first use (0.1-0.2 s, paid
    once by a search that checks many models) and again after a crash, stopped when edgec exits.
    Each call imports what its function needs there."""
    global _shared
    with _sharing:
        if _shared is None or not _shared.alive():
            _shared = ChildInterpreter(__name__, quiet=True)  # the caller reports what went wrong
            atexit.register(_shared.stop)
        return _shared


class BackgroundChild:
    """A ``ChildInterpreter`` whose calls run on a thread of this process, so the caller goes on."""

    def __init__(self, preload: str):
        self.child = ChildInterpreter(preload)
        self.calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgec-child")  # waits for the replies

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self.calls.submit(self.child.call, function, *args)

    def stop(self) -> None:
        self.child.stop()
        self.calls.shutdown(wait=True, cancel_futures=True)  # the call in flight ends with the child's pipe


def serve(preload: str) -> None:
    """The child's loop: a call from stdin, its pickled (ok, result or error, warnings) to
    stdout. Ctrl-C reaches the child too; the parent says what it stopped, the child nothing."""
    with contextlib.suppress(KeyboardInterrupt):
        _serve(preload)


def _serve(preload: str) -> None:
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, not into the replies
    importlib.import_module(preload)
    requests = sys.stdin.buffer
    while True:
        try:
            function, args = pickle.load(requests)
        except EOFError:  # the parent is done with this child
            return
        try:
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                reply = (True, function(*args), [w.message for w in warned])
        except Exception as exc:  # the parent decides: do the work again, or report it
            reply = (False, f"{type(exc).__name__}: {exc}", [])
        pickle.dump(reply, replies)
        replies.flush()
