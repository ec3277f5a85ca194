"""Lowering work started ahead, in a worker process, for a backend whose lowering is slow
and single-threaded (TFLite: TensorFlow's conversion and calibration).

An int8 build converts a model up to three times (two accuracy-recovery variants, then fp32
for the speed check); a 3-GMAC detector's conversions took 8-14 s each on one core while
the other idled. Inside ``worker()``, a backend ``submit``s work the build will need next to
one worker process, and ``take``s the result where it needs it. The work must be
deterministic, so the result is the same in either process; work that fails in the worker
(or a worker that dies) is simply done again in the build's process, which then raises its
error as it always did.

The worker is an ``edgec.child.BackgroundChild``: a child interpreter, fed pickled calls.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from edgec.child import BackgroundChild

_worker: BackgroundChild | None = None
_pending: dict[str, concurrent.futures.Future] = {}


@contextlib.contextmanager
def worker(preload: str) -> Iterator[None]:
    """One worker process for the work submitted inside, importing module ``preload`` from
    the start; stopped (with whatever it still runs) on leaving, so nothing outlives the build."""
    global _worker
    if _worker is not None or _cores() < 2:  # nested, or no second core to use
        yield
        return
    _worker = BackgroundChild(preload)
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
