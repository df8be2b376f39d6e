"""Worker loss with real kills: a worker process SIGKILLed while running early-acked
tasks fails them with WorkerLostError (on each broker), and an acks_late task that
stored SUCCESS is not run again when its message comes back."""

from __future__ import annotations

import importlib
import os
import signal
import time

import pytest
import redis

from celeriac import states
from celeriac.exceptions import WorkerLostError
from celeriac.protocol import build_task_message, encode_envelope

from .conftest import Worker, write_module

TASKS = """
import asyncio
import os
import time
from celeriac import Celery

app = Celery('losstasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task
def slow(seconds):
    time.sleep(seconds)
    return 'finished'


@app.task
async def async_slow(seconds):
    await asyncio.sleep(seconds)
    return 'finished'


@app.task(acks_late=True)
def append(path):
    with open(path, 'a') as f:
        f.write('ran\\n')
    return 'appended'
"""


@pytest.fixture
def losstasks(broker_env, project):
    write_module(project, "losstasks", TASKS)
    return importlib.import_module("losstasks")


def _states(result):
    return [h["state"] for h in result.history]


def test_a_killed_process_fails_its_running_tasks_with_worker_lost_error(
        losstasks, broker_env, project, workers):
    worker = Worker(project, "losstasks", env=broker_env, concurrency=1)
    workers.append(worker)
    running = [losstasks.slow.delay(30), losstasks.async_slow.delay(30)]
    deadline = time.monotonic() + 15
    while not all(states.RECEIVED in _states(r) for r in running):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [pid] = worker.child_pids()
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    for r in running:
        with pytest.raises(WorkerLostError, match="signal 9"):
            r.get(timeout=10)
        assert r.state == states.FAILURE
        assert _states(r) == [states.PENDING, states.RECEIVED, states.FAILURE]
        assert r.history[-1]["meta"]["pid"] == pid
    assert time.monotonic() - began < 3
    worker.wait_for_log("starting a new one")
    done = [losstasks.slow.delay(0) for _ in range(5)]
    assert [r.get(timeout=20) for r in done] == ["finished"] * 5
    assert worker.stop() == 0
    # a warm stop right after tasks finished loses none of them
    assert worker.log.count("WorkerLostError") == 2, worker.log


def test_a_task_that_succeeded_is_not_run_again_when_delivered_again(project, redis_url,
                                                                     monkeypatch, workers):
    """The worker died after storing SUCCESS and before acking: the message comes back
    (marked redelivered, as the Redis transport restores it) and is acked unrun."""
    env = {"TEST_BROKER": redis_url, "TEST_BACKEND": redis_url, "TEST_QUEUE": "celery"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    write_module(project, "losstasks", TASKS)
    tasks = importlib.import_module("losstasks")
    worker = Worker(project, "losstasks", env=env)
    workers.append(worker)
    path = str(project / "runs")
    r = tasks.append.delay(path)
    assert r.get(timeout=20) == "appended"

    again = build_task_message("losstasks.append", [path], {}, task_id=r.id, queue="celery",
                               serializer="json")
    again.properties["delivery_info"] = {"exchange": "", "routing_key": "celery",
                                         "redelivered": True}
    redis.Redis.from_url(redis_url).lpush("celery", encode_envelope(again))
    worker.wait_for_log(f"Task losstasks.append[{r.id}] succeeded already: not run again")
    fresh = tasks.append.delay(path)  # a new task with the same body does run
    assert fresh.get(timeout=20) == "appended"
    with open(path) as f:
        assert f.read() == "ran\nran\n"
    assert _states(r).count(states.SUCCESS) == 1
