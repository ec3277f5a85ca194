"""Where independent work of a search runs: in this process (``local``) or as tasks on a Ray
cluster (``ray``), with each physical board behind one actor that measures one thing at a time.

A task is submitted and its outcome collected later (``submit`` → ``Pending.result``): Ray
starts it at once, the local executor when the outcome is asked for. A driver that asks,
submits and tells in a fixed order (Optuna's ask/tell) therefore makes the same choices on
either, while Ray keeps every worker busy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from edgec.checks import one_of, option

EXECUTORS = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class Task:
    """One call of ``fn(*args)``; ``fn`` must be a module-level function (Ray sends it by reference)."""

    fn: Callable[..., Any]
    args: tuple = ()
    cpus: float = 1.0  # what one run needs, for Ray's scheduler
    board: str | None = None  # a physical device the call measures on: one call at a time per board


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a task gave, or why it failed after its retries (then ``value`` is None)."""

    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Pending(Protocol):
    def result(self) -> Outcome:
        """The task's outcome, waiting for it (the local executor runs the task now)."""


class Executor:
    """Where tasks run; subclasses submit them."""

    name: str
    workers: int  # how many tasks run at once

    def prepare(self, modules: Sequence[str]) -> None:
        """Start importing ``modules`` where tasks will run, without waiting (seconds of
        TensorFlow per worker process, otherwise paid by the first task there)."""

    def submit(self, task: Task) -> Pending:
        raise NotImplementedError

    def run(self, tasks: Sequence[Task]) -> list[Outcome]:
        """Every task submitted at once, the outcomes in task order."""
        pending = [self.submit(task) for task in tasks]
        return [p.result() for p in pending]

    def close(self) -> None:
        """Release what the executor started."""


def make_executor(kind: str, address: str | None = None) -> Executor:
    """The executor named ``kind``; ``address`` (Ray only) joins an existing cluster, else a
    local Ray is started now and stopped by ``close``."""
    one_of(option("executor"), kind, EXECUTORS)
    if kind == "local":
        if address:
            from edgec.errors import OptionError

            raise OptionError("--ray-address needs --executor ray.", hint="Add --executor ray, or drop --ray-address.")
        from edgec.executors.local import LocalExecutor

        return LocalExecutor()
    from edgec.executors.ray_cluster import RayExecutor

    return RayExecutor(address)
