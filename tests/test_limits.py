"""Time limits with real workers on each broker: soft limits raised inside def and
async tasks, hard limits per task, per call and from the worker's settings, and a
task that will not stop."""

from __future__ import annotations

import importlib
import time

import pytest

from celeriac import states
from celeriac.exceptions import TimeLimitExceeded

from .conftest import Worker, write_module

TASKS = """
import asyncio
import os
import time
from celeriac import Celery
from celeriac.exceptions import SoftTimeLimitExceeded

app = Celery('limits', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'], task_time_limit=4)


@app.task(soft_time_limit=0.5)
def soft_caught():
    try:
        time.sleep(20)
    except SoftTimeLimitExceeded:
        return 'caught'
    return 'not interrupted'


@app.task(soft_time_limit=0.5)
async def async_soft_caught():
    try:
        await asyncio.sleep(20)
    except SoftTimeLimitExceeded:
        await asyncio.sleep(0.1)  # the task goes on awaiting after catching it
        return 'caught'
    return 'not interrupted'


@app.task(soft_time_limit=0.3)
def soft_uncaught():
    time.sleep(20)


@app.task(time_limit=0.5)
def hard():
    time.sleep(20)


@app.task(time_limit=0.5)
async def async_hard():
    await asyncio.sleep(20)


@app.task
def sleeper(seconds):
    time.sleep(seconds)
    return seconds


@app.task(time_limit=0.5)
def stubborn():
    while True:
        try:
            time.sleep(20)
        except BaseException:
            pass


@app.task
def quick(x):
    return x
"""


@pytest.fixture
def tasks(broker_env, project, workers):
    write_module(project, "limits", TASKS)
    module = importlib.import_module("limits")
    workers.append(Worker(project, "limits", env=broker_env, concurrency=2))
    return module


#: The tasks below sleep 20 s unless a limit stops them; a limit that works stops them
#: well before that (these bounds tell the two apart, they are not about speed).
STOPPED_EARLY = 15


def _timed_failure(result, timeout: float = 30) -> tuple[BaseException, float]:
    began = time.monotonic()
    with pytest.raises(Exception) as caught:
        result.get(timeout=timeout)
    return caught.value, time.monotonic() - began


def test_soft_limit_is_raised_inside_def_and_async_tasks(tasks):
    began = time.monotonic()
    results = [tasks.soft_caught.delay(), tasks.async_soft_caught.delay()]
    assert [r.get(timeout=30) for r in results] == ["caught", "caught"]
    assert time.monotonic() - began < STOPPED_EARLY

    error, took = _timed_failure(tasks.soft_uncaught.delay())
    assert type(error).__name__ == "SoftTimeLimitExceeded"
    assert took < STOPPED_EARLY


def test_hard_limit_stops_the_task_and_stores_time_limit_exceeded(tasks, workers):
    for task in (tasks.hard, tasks.async_hard):
        r = task.delay()
        error, took = _timed_failure(r)
        assert isinstance(error, TimeLimitExceeded), error
        assert error.args == (0.5,)
        assert took < STOPPED_EARLY
        assert r.state == states.FAILURE
        assert [h["state"] for h in r.history][-1] == states.FAILURE
    assert tasks.quick.delay(7).get(timeout=10) == 7  # the worker goes on
    assert "Hard time limit (0.5s) exceeded" in workers[0].log
    assert "replaced" not in workers[0].log


def test_limits_per_call_and_from_the_workers_settings(tasks):
    assert tasks.sleeper.apply_async((0.1,), time_limit=2).get(timeout=10) == 0.1
    error, took = _timed_failure(tasks.sleeper.apply_async((20,), time_limit=0.5))
    assert isinstance(error, TimeLimitExceeded) and took < STOPPED_EARLY
    error, _ = _timed_failure(tasks.sleeper.apply_async((20,), soft_time_limit=0.3))
    assert type(error).__name__ == "SoftTimeLimitExceeded"
    # no limit on the task or the call: the worker's task_time_limit (4 s)
    error, took = _timed_failure(tasks.sleeper.delay(20))
    assert isinstance(error, TimeLimitExceeded) and error.args == (4.0,)
    assert took < STOPPED_EARLY


def test_a_task_that_will_not_stop_gets_its_process_replaced(tasks, workers):
    worker = workers[0]
    before = set(worker.child_pids())
    r = tasks.stubborn.delay()
    error, took = _timed_failure(r)
    assert isinstance(error, TimeLimitExceeded)
    assert took < STOPPED_EARLY
    worker.wait_for_log("will be replaced")
    worker.wait_for_log("starting a new one")
    # every task still runs: nothing was lost with the replaced process
    assert [r.get(timeout=20) for r in [tasks.quick.delay(i) for i in range(20)]] == list(
        range(20))
    assert set(worker.child_pids()) != before
