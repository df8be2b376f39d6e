"""Revoke with real workers on each broker: tasks waiting in the queue, tasks revoked
while no worker was up (Celery#8888), terminate for running def and async tasks; and
revokes crossing between Celery 5.7 and celeriac."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest

from celeriac import states
from celeriac.exceptions import TaskRevokedError

from .conftest import CeleryWorker, Worker, write_module

TASKS = """
import asyncio
import os
import time
from celeriac import Celery

app = Celery('rtasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task(name='rtasks.touch')
def touch(path):
    open(path, 'a').close()
    return path


@app.task(name='rtasks.slow')
def slow(seconds):
    time.sleep(seconds)
    return 'finished'


@app.task(name='rtasks.async_slow')
async def async_slow(seconds):
    await asyncio.sleep(seconds)
    return 'finished'
"""


def _states(result):
    return [h["state"] for h in result.history]


def _wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def rtasks(broker_env, project):
    write_module(project, "rtasks", TASKS)
    return importlib.import_module("rtasks")


def test_a_task_revoked_while_no_worker_is_up_never_runs(rtasks, broker_env, project,
                                                         workers):
    """Celery#8888: the revoke is kept in the result store, so a worker that starts
    afterwards discards the message.  REVOKED is stored at once."""
    marker = project / "ran"
    r = rtasks.touch.delay(str(marker))
    later = rtasks.touch.apply_async((str(project / "ran-later"),), countdown=3)
    r.revoke()
    later.revoke()
    assert r.state == states.REVOKED and later.state == states.REVOKED
    with pytest.raises(TaskRevokedError):
        r.get(timeout=1)
    kept = rtasks.touch.delay(str(project / "kept"))

    worker = Worker(project, "rtasks", env=broker_env)
    workers.append(worker)
    assert kept.get(timeout=20) == str(project / "kept")
    worker.wait_for_log(f"Discarding revoked task: rtasks.touch[{r.id}]")
    worker.wait_for_log(f"Discarding revoked task: rtasks.touch[{later.id}]", timeout=20)
    assert not marker.exists() and not (project / "ran-later").exists()
    assert _states(r) == [states.PENDING, states.REVOKED]
    assert r.history[-1]["meta"]["exc_message"] == ["revoked"]


def test_an_expired_task_is_revoked_when_it_expires_and_never_runs(rtasks, broker_env,
                                                                  project, workers):
    """``expires`` that passes while the message waits with no worker up, and one that
    comes long before a countdown: REVOKED ('expired') is stored when it expires (not at
    the ETA an hour later) and the task never runs.  On RabbitMQ too: celeriac sets no
    AMQP ``expiration``, so the broker does not drop the message unseen."""
    stale = rtasks.touch.apply_async((str(project / "stale"),), expires=0.5)
    time.sleep(1.0)
    workers.append(Worker(project, "rtasks", env=broker_env))
    with pytest.raises(TaskRevokedError, match="expired"):
        stale.get(timeout=15)
    sent = time.monotonic()
    far = rtasks.touch.apply_async((str(project / "far"),), countdown=3600, expires=3)
    with pytest.raises(TaskRevokedError, match="expired"):
        far.get(timeout=15)
    assert time.monotonic() - sent >= 2.5  # not before it expired (nor at its ETA)
    for r in (stale, far):
        assert _states(r) == [states.PENDING, states.REVOKED]
        assert r.history[-1]["meta"]["exc_message"] == ["expired"]
    assert not (project / "stale").exists() and not (project / "far").exists()


def test_revoking_a_waiting_task_with_a_worker_up(rtasks, broker_env, project, workers):
    workers.append(Worker(project, "rtasks", env=broker_env))
    marker = project / "ran"
    r = rtasks.touch.apply_async((str(marker),), countdown=2)
    time.sleep(0.5)  # the worker has it (kept in the broker, or waited for)
    rtasks.app.control.revoke([r.id])
    assert r.state == states.REVOKED
    workers[0].wait_for_log(f"Discarding revoked task: rtasks.touch[{r.id}]", timeout=20)
    assert not marker.exists()
    assert states.RECEIVED not in _states(r)


def test_revoke_without_terminate_lets_a_running_task_finish(rtasks, broker_env, project,
                                                             workers):
    workers.append(Worker(project, "rtasks", env=broker_env))
    r = rtasks.slow.delay(1.0)
    _wait_for(lambda: states.RECEIVED in _states(r))
    r.revoke()
    assert r.get(timeout=20) == "finished"
    assert r.state == states.SUCCESS


@pytest.mark.parametrize("task", ["slow", "async_slow"])
def test_terminate_stops_a_running_task(rtasks, broker_env, project, workers, task):
    workers.append(Worker(project, "rtasks", env=broker_env))
    r = getattr(rtasks, task).delay(30)
    _wait_for(lambda: states.RECEIVED in _states(r))
    r.revoke(terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError) as caught:
        r.get(timeout=20)  # long before the task's 30 s are up
    assert caught.value.args == ("terminated",)
    assert r.state == states.REVOKED
    assert _states(r)[-1] == states.REVOKED
    assert rtasks.slow.delay(0).get(timeout=20) == "finished"  # the worker goes on
    assert "replaced" not in workers[0].log


# --------------------------------------------------------------------------- with Celery

CELERY_TASKS = TASKS.replace("from celeriac import Celery", "from celery import Celery")


#: Celery has no embedded SQLite broker: the tests with Celery run on the servers only.
on_servers = pytest.mark.parametrize("broker_env", ["redis", "amqp"], indirect=True)


@on_servers
def test_a_celery_worker_obeys_a_celeriac_revoke(rtasks, broker_env, project: Path, workers):
    write_module(project, "crtasks", CELERY_TASKS.replace("'rtasks'", "'crtasks'"))
    workers.append(CeleryWorker(project, "crtasks", env=broker_env, pool="prefork"))
    r = rtasks.slow.delay(30)
    workers[0].wait_for_log(f"Task rtasks.slow[{r.id}] received")
    time.sleep(0.5)  # handed to the pool process
    r.revoke(terminate=True, signal="SIGKILL")
    workers[0].wait_for_log(f"Terminating {r.id} (9)")
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    marker = project / "celery-ran"
    waiting = rtasks.touch.apply_async((str(marker),), countdown=2)
    time.sleep(0.5)
    waiting.revoke()
    workers[0].wait_for_log(f"Discarding revoked task: rtasks.touch[{waiting.id}]",
                            timeout=20)
    assert not marker.exists()


@on_servers
def test_a_celeriac_worker_obeys_a_celery_revoke(rtasks, broker_env, project: Path,
                                                 workers):
    import celery

    workers.append(Worker(project, "rtasks", env=broker_env))
    capp = celery.Celery("sender", broker=broker_env["TEST_BROKER"],
                         backend=broker_env["TEST_BACKEND"])
    r = rtasks.slow.delay(30)
    _wait_for(lambda: states.RECEIVED in _states(r))
    capp.control.revoke(r.id, terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    workers[0].wait_for_log(f"Terminating rtasks.slow[{r.id}]")


@on_servers
def test_a_celery_worker_runs_a_celeriac_eta_message(rtasks, broker_env, project: Path,
                                                     workers):
    write_module(project, "crtasks", CELERY_TASKS.replace("'rtasks'", "'crtasks'"))
    workers.append(CeleryWorker(project, "crtasks", env=broker_env))
    began = time.monotonic()
    r = rtasks.touch.apply_async((str(project / "eta"),), countdown=2)
    assert r.get(timeout=20) == str(project / "eta")
    assert time.monotonic() - began >= 1.9
    assert (project / "eta").exists()


@on_servers
def test_expires_holds_between_celery_and_celeriac(rtasks, broker_env, project: Path,
                                                   workers):
    """A celeriac message that expired while it waited: a Celery 5.7 worker stores
    REVOKED ('expired') and does not run it.  A Celery message that expired: a celeriac
    worker does the same (on Redis; on RabbitMQ, Celery's AMQP ``expiration`` makes the
    broker drop it unseen)."""
    import celery

    write_module(project, "crtasks", CELERY_TASKS.replace("'rtasks'", "'crtasks'"))
    r = rtasks.touch.apply_async((str(project / "celery-ran"),), expires=0.5)
    time.sleep(1.0)
    celery_worker = CeleryWorker(project, "crtasks", env=broker_env)
    workers.append(celery_worker)
    with pytest.raises(TaskRevokedError, match="expired"):
        r.get(timeout=20)
    assert celery_worker.stop() == 0
    assert not (project / "celery-ran").exists()
    if broker_env["TEST_BROKER"].startswith("amqp"):
        return
    capp = celery.Celery("sender", broker=broker_env["TEST_BROKER"],
                         backend=broker_env["TEST_BACKEND"])
    c = capp.send_task("rtasks.touch", (str(project / "celeriac-ran"),), expires=0.5)
    time.sleep(1.0)
    workers.append(Worker(project, "rtasks", env=broker_env))
    with pytest.raises(TaskRevokedError, match="expired"):
        rtasks.app.AsyncResult(c.id).get(timeout=20)
    assert not (project / "celeriac-ran").exists()
