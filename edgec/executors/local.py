"""The local executor: tasks run one after the other in this process."""

from __future__ import annotations

import traceback
from collections.abc import Sequence

from edgec.executors import Outcome, Task


class LocalExecutor:
    name = "local"
    workers = 1

    def prepare(self, modules: Sequence[str]) -> None:
        pass  # tasks run here: they import what they use when they run

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        return [run_task(task) for task in tasks]

    def close(self) -> None:
        pass


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
