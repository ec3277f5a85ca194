"""The Ray executor: tasks run on a Ray cluster with their CPU needs declared, each physical
board is one actor (Ray runs an actor's calls one at a time, so a board measures one artifact at
a time), and a task whose worker dies (killed, out of memory) is retried ``RETRIES`` times before
it counts as failed."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import Any

from edgec.errors import ExecutorError
from edgec.executors import Executor, Outcome, Task

RETRIES = 2  # re-runs of a task after its worker died; then the candidate is recorded as failed
NAMESPACE = "edgec"  # board actors are found by name in it, so two drivers share one board
# Workers import TensorFlow through edgec; keep them as quiet as the CLI. Tasks declare one
# CPU (Task.cpus), so their thread pools and edgec's own second process (edgec.lower.ahead)
# keep to one: two workers on two cores would otherwise each spread over both.
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1", "OMP_NUM_THREADS": "1",
              "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "EDGEC_CPUS": "1"}


def _call(fn, args: tuple) -> Any:
    return fn(*args)


def _import(modules: Sequence[str]) -> None:
    for module in modules:
        importlib.import_module(module)


class _Board:
    """The one process that talks to a board; its calls queue up one behind the other."""

    def call(self, fn, args: tuple) -> Any:
        return fn(*args)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None = None):
        self._ray = _import_ray()
        self.address = address or "a local Ray started for this run"
        _connect(self._ray, address)
        self._task = self._ray.remote(max_retries=RETRIES, retry_exceptions=False)(_call)
        self._board_class = self._ray.remote(num_cpus=0, max_restarts=RETRIES, max_task_retries=RETRIES)(_Board)
        self._boards: dict[str, Any] = {}
        self._warming: list = []  # import tasks started by prepare (kept so their results are not dropped early)

    @property
    def workers(self) -> int:
        """The cluster's CPUs now (nodes may join or leave during a search)."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def prepare(self, modules: Sequence[str]) -> None:
        """One import task per CPU of the cluster, so every worker has ``modules`` loaded
        before the first candidate reaches it (on two cores a worker's first import of edgec's
        build and TensorFlow took 6.5 s)."""
        self._warming = [self._task.options(num_cpus=1).remote(_import, (tuple(modules),)) for _ in range(self.workers)]

    def submit(self, task: Task) -> "_Running":
        """``task`` started now on the cluster (or queued for a free CPU, or its board)."""
        if task.board is not None:
            return _Running(self._ray, self._board(task.board).call.remote(task.fn, task.args))
        return _Running(self._ray, self._task.options(num_cpus=task.cpus).remote(task.fn, task.args))

    def close(self) -> None:
        """Stop the local Ray this executor started, or disconnect from the cluster."""
        self._ray.shutdown()

    def _board(self, name: str):
        """The board's actor, on this driver's machine: ``local`` is this machine, and the
        device inventory (SSH keys, addresses) is the one the user gave here."""
        if name not in self._boards:
            here = self._ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                self._ray.get_runtime_context().get_node_id(), soft=False)
            self._boards[name] = self._board_class.options(name=f"board:{name}", namespace=NAMESPACE, get_if_exists=True,
                                                           scheduling_strategy=here).remote()
        return self._boards[name]


class _Running:
    """A submitted Ray task or board call."""

    def __init__(self, ray, ref):
        self._ray, self._ref = ray, ref

    def result(self) -> Outcome:
        try:
            return Outcome(self._ray.get(self._ref))
        except self._ray.exceptions.RayTaskError as exc:  # the function raised
            return Outcome(error=f"{type(exc.cause).__name__}: {exc.cause}")
        except self._ray.exceptions.RayError as exc:  # its worker or board died, every retry
            return Outcome(error=f"{type(exc).__name__} after {RETRIES} retries: {str(exc).splitlines()[0]}")


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError("--executor ray needs Ray, which is not installed.",
                            hint="Install it with pip install 'edgec[ray]' (or use --executor local).") from exc
    return ray


def _connect(ray, address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one with this machine's CPUs."""
    settings = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, namespace=NAMESPACE,
                    runtime_env={"env_vars": WORKER_ENV})
    try:
        if address:
            ray.init(address=address, **settings)
        else:  # "local": a new Ray of our own, even when another one runs on this machine
            ray.init(address="local", num_cpus=os.cpu_count(), **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:  # what ray.init raises for a bad or dead address
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ExecutorError(f"Could not start or reach {where}: {(str(exc).splitlines() or [type(exc).__name__])[0].rstrip('.')}.",
                            hint="Check that `ray start --head` runs there and that the address and port are right "
                                 "(e.g. 127.0.0.1:6379, or ray://HEAD:10001 for Ray Client).") from exc
