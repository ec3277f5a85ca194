"""edgec.executors on a real Ray cluster of two processes on 127.0.0.1 (a head and one worker
node, started with `ray start` as the README shows), against the local executor."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from edgec.errors import OptionError
from edgec.executors import Task, make_executor

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def on_ray(ray_cluster):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    executor = make_executor("ray", ray_cluster)
    yield executor
    executor.close()


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"candidate {x} is broken")
    return x


def die_once(marker: str) -> str:
    """Kill the worker running this the first time (as the OOM killer would), succeed the next."""
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)
    return "survived"


def die_always() -> None:
    os._exit(1)


def hold(log: str, seconds: float) -> int:
    """Record when this call held the board: (start, end) appended to ``log``."""
    start = time.time()
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(f"{start} {time.time()}\n")
    return os.getpid()


def test_ray_runs_a_batch_in_parallel_and_returns_what_local_returns_in_task_order(on_ray):
    tasks = [Task(square, (x,)) for x in range(6)]
    assert [o.value for o in on_ray.run(tasks)] == [o.value for o in make_executor("local").run(tasks)] == [x * x for x in range(6)]
    assert on_ray.workers == 2
    pids = {o.value for o in on_ray.run([Task(hold, ("/dev/null", 1.0)) for _ in range(4)])}
    assert len(pids) == 2, "both workers took tasks"


def test_a_failing_task_fails_alone_on_both_executors(on_ray):
    tasks = [Task(fail_on, (x, 1)) for x in range(3)]
    for executor in (on_ray, make_executor("local")):
        outcomes = executor.run(tasks)
        assert [o.ok for o in outcomes] == [True, False, True]
        assert "candidate 1 is broken" in outcomes[1].error


def test_a_killed_worker_is_retried_and_a_task_that_always_dies_is_recorded_failed(on_ray, tmp_path):
    outcomes = on_ray.run([Task(square, (3,)), Task(die_once, (str(tmp_path / "died"),)), Task(die_always)])
    assert outcomes[0].value == 9  # nothing finished is lost
    assert outcomes[1].value == "survived" and (tmp_path / "died").exists()
    assert not outcomes[2].ok and "retries" in outcomes[2].error


def test_a_board_measures_one_artifact_at_a_time(on_ray, tmp_path):
    log = tmp_path / "board.log"
    outcomes = on_ray.run([Task(hold, (str(log), 0.5), board="pi4") for _ in range(3)] + [Task(square, (2,))])
    assert all(o.ok for o in outcomes)
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_bad_executor_options_are_errors():
    with pytest.raises(OptionError, match="executor"):
        make_executor("dask")
    with pytest.raises(OptionError, match="--ray-address needs --executor ray"):
        make_executor("local", "127.0.0.1:6379")
