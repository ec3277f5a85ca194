"""The local executor: tasks run one after the other in this process."""

from __future__ import annotations

import traceback

from edgec.executors import Executor, Outcome, Task


class LocalExecutor(Executor):
    """Tasks run here, one at a time, when their outcome is asked for (so in the order a
    driver collects them); they import what they use when they run."""

    name = "local"
    workers = 1

    def submit(self, task: Task) -> "_Deferred":
        return _Deferred(task)


class _Deferred:
    """A task run at its first ``result()``."""

    def __init__(self, task: Task):
        self._task, self._outcome = task, None

    def result(self) -> Outcome:
        if self._outcome is None:
            self._outcome = run_task(self._task)
        return self._outcome


def run_task(task: Task) -> Outcome:
    """``task``'s value; an exception fails this task only (the search records it and goes on)."""
    try:
        return Outcome(task.fn(*task.args))
    except Exception as exc:  # noqa: BLE001 - a failed candidate, not a failed search
        return Outcome(error=_describe(exc))


def _describe(exc: BaseException) -> str:
    """One line naming the exception and where it was raised."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"
