"""Lowering work started ahead, in a worker process, for a backend whose lowering is slow
and single-threaded (TFLite: TensorFlow's conversion and calibration).

An int8 build converts a model up to three times (two accuracy-recovery variants, then fp32
for the speed check); a 3-GMAC detector's conversions took 8-14 s each on one core while
the other idled. Inside ``worker()``, a backend ``submit``s work the build will need next to
one worker process, and ``take``s the result where it needs it. The work must be
deterministic, so the result is the same in either process; work that fails in the worker
is simply done again in the build's process, which then raises its error as it always did.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pending: dict[str, concurrent.futures.Future] = {}


@contextlib.contextmanager
def worker(preload: str) -> Iterator[None]:
    """One worker process for the work submitted inside, importing module ``preload`` from
    the start; stopped (with whatever it still runs) on leaving, so nothing outlives the build."""
    global _pool
    if _pool is not None or (os.cpu_count() or 1) < 2:  # nested, or no second core to use
        yield
        return
    _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    _pool.submit(_import, preload)  # while the build prepares what it will submit
    try:
        yield
    finally:
        pool, _pool = _pool, None
        _pending.clear()
        _stop(pool)


def active() -> bool:
    """Whether work submitted now runs in a worker (inside ``worker()``, on two cores or more)."""
    return _pool is not None


def submit(key: str, convert: Callable[..., Any], *args: Any) -> None:
    """Run ``convert(*args)`` (a module-level function; the arguments are pickled) in the
    worker, remembered by ``key``; nothing outside ``worker()``."""
    if _pool is not None and key not in _pending:
        _pending[key] = _pool.submit(convert, *args)


def take(key: str) -> Any | None:
    """The result of the work submitted as ``key`` (waiting for it), or None when none was,
    or it failed."""
    future = _pending.pop(key, None)
    if future is None or future.exception() is not None:
        return None
    return future.result()


def _import(module: str) -> None:
    importlib.import_module(module)


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting for work nobody needs any more."""
    processes = list((pool._processes or {}).values())  # noqa: SLF001 (the executor offers no terminate)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
        process.join()
