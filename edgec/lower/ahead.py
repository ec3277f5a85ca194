"""Lowering work started ahead, in a worker process, for a backend whose lowering is slow
and single-threaded (TFLite: TensorFlow's conversion and calibration).

An int8 build converts a model up to three times (two accuracy-recovery variants, then fp32
for the speed check); a 3-GMAC detector's conversions took 8-14 s each on one core while
the other idled. Inside ``worker()``, a backend ``submit``s work the build will need next to
one worker process, and ``take``s the result where it needs it. The work must be
deterministic, so the result is the same in either process; work that fails in the worker
(or a worker that dies) is simply done again in the build's process, which then raises its
error as it always did.

The worker is a Python process running ``serve``, fed pickled calls on its stdin, not a
``multiprocessing`` child: those import the caller's main module again, which runs a user's
unguarded build script a second time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import os
import pickle
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_worker: _Worker | None = None
_pending: dict[str, concurrent.futures.Future] = {}


class _Worker:
    """A child interpreter that runs the calls it is sent one at a time, in order."""

    def __init__(self, preload: str):
        paths = [str(Path(__file__).resolve().parents[2]), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this edgec, whatever put it on sys.path
        serve = f"from {__name__} import serve; serve({preload!r})"
        self.process = subprocess.Popen([sys.executable, "-c", serve], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.calls = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgec-ahead")  # waits for the child's replies

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        return self.calls.submit(self._call, function, args)

    def _call(self, function: Callable[..., Any], args: tuple) -> Any:
        pickle.dump((function, args), self.process.stdin)
        self.process.stdin.flush()
        ok, result, warned = pickle.load(self.process.stdout)  # EOFError when the child died
        if not ok:
            raise RuntimeError(f"in the worker process: {result}")
        return result, warned

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.calls.shutdown(wait=True, cancel_futures=True)  # the call in flight ends with the child's pipe


@contextlib.contextmanager
def worker(preload: str) -> Iterator[None]:
    """One worker process for the work submitted inside, importing module ``preload`` from
    the start; stopped (with whatever it still runs) on leaving, so nothing outlives the build."""
    global _worker
    if _worker is not None or _cores() < 2:  # nested, or no second core to use
        yield
        return
    _worker = _Worker(preload)
    try:
        yield
    finally:
        stopping, _worker = _worker, None
        _pending.clear()
        stopping.stop()


def _cores() -> int:
    """The cores this process may use: ``EDGEC_CPUS`` where a scheduler gave it fewer than the
    machine has (a Ray task declaring one CPU), else all of them."""
    return int(os.environ.get("EDGEC_CPUS") or os.cpu_count() or 1)


def active() -> bool:
    """Whether work submitted now runs in a worker (inside ``worker()``, on two cores or more)."""
    return _worker is not None


def submit(key: str, function: Callable[..., Any], *args: Any) -> None:
    """Run ``function(*args)`` (module-level; the arguments and result are pickled) in the
    worker, remembered by ``key``; nothing outside ``worker()``."""
    if _worker is not None and key not in _pending:
        _pending[key] = _worker.submit(function, *args)


def take(key: str) -> Any | None:
    """The result of the work submitted as ``key`` (waiting for it), or None when none was,
    or it failed."""
    future = _pending.pop(key, None)
    if future is None or future.exception() is not None:
        return None
    result, warned = future.result()
    for message in warned:  # said here, where the build's warnings are shown, as if the work ran here
        warnings.warn(message, stacklevel=2)
    return result


def serve(preload: str) -> None:
    """The worker's loop: a call from stdin, its pickled (ok, result or error, warnings) to
    stdout. Ctrl-C reaches the worker too; the build says what it stopped, the worker nothing."""
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
        except EOFError:  # the build is done with this worker
            return
        try:
            with warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                reply = (True, function(*args), [w.message for w in warned])
        except Exception as exc:  # the build's process does the work again and reports its error
            reply = (False, f"{type(exc).__name__}: {exc}", [])
        pickle.dump(reply, replies)
        replies.flush()
