"""Redis broker and result backend: celeriac alone, and mixed with real Celery 5.7
producers and workers on the same queue and result keys."""

from __future__ import annotations

import importlib
import json
import os
import time
from datetime import UTC, datetime

import celery
import pytest
import redis

from celeriac import states

from .conftest import CeleryWorker, Worker, write_module

CELERIAC_TASKS = """
import os, time
from celeriac import Celery

app = Celery('tasks', broker=os.environ['TEST_REDIS_URL'],
             broker_transport_options={'visibility_timeout': float(os.environ.get('VT', 3600))})
app.conf.task_track_started = True
app.conf.worker_prefetch_multiplier = int(os.environ.get('PREFETCH', 4))


@app.task(bind=True)
def add(self, x, y):
    self.update_state(state='PROGRESS', meta={'x': x})
    return x + y


@app.task
def nap(x):
    time.sleep(0.02)
    return 2 * x


@app.task
def fail(value):
    raise ValueError('bad value', value)


@app.task
def structured(when):
    return {'when': when, 'items': [1, 'two', [3.5, None]], 'ok': True}


@app.task(acks_late=True)
def slow(seconds):
    time.sleep(seconds)
    return 'slept'
"""

CELERY_TASKS = """
import os
from celery import Celery

app = Celery('tasks', broker=os.environ['TEST_REDIS_URL'], backend=os.environ['TEST_REDIS_URL'])
app.conf.task_track_started = True


@app.task(bind=True, name='tasks.add')
def add(self, x, y):
    self.update_state(state='PROGRESS', meta={'x': x})
    return x + y


@app.task(name='tasks.nap')
def nap(x):
    import time
    time.sleep(0.02)
    return 2 * x


@app.task(name='tasks.fail')
def fail(value):
    raise ValueError('bad value', value)


@app.task(name='tasks.structured')
def structured(when):
    return {'when': when, 'items': [1, 'two', [3.5, None]], 'ok': True}
"""


@pytest.fixture
def env(project, redis_url, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    return {"TEST_REDIS_URL": redis_url}


def _celeriac(project):
    write_module(project, "tasks", CELERIAC_TASKS)
    return importlib.import_module("tasks")


def _celery_client(redis_url):
    return celery.Celery("client", broker=redis_url, backend=redis_url)


def test_celeriac_alone_on_redis(project, env, workers, redis_url):
    tasks = _celeriac(project)
    assert tasks.app.result_backend_url == redis_url  # the default: the broker's server
    workers.append(Worker(project, "tasks", env=env))
    r = tasks.add.delay(2, 3)
    assert r.get(timeout=10) == 5
    assert [h["state"] for h in r.history] == [
        "PENDING", "RECEIVED", "STARTED", "PROGRESS", "SUCCESS"]
    with pytest.raises(ValueError, match="bad value"):
        tasks.fail.delay(7).get(timeout=10)
    client = redis.Redis.from_url(redis_url)
    meta = json.loads(client.get(f"celery-task-meta-{r.id}"))
    assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
    assert 86000 < client.ttl(f"celery-task-meta-{r.id}") <= 86400
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    assert client.sismember("_kombu.binding.celery", "celery\x06\x16\x06\x16celery")


def test_celery_producer_celeriac_worker(project, env, workers, redis_url):
    _celeriac(project)
    workers.append(Worker(project, "tasks", env=env))
    capp = _celery_client(redis_url)
    r = capp.send_task("tasks.add", (2, 3))
    assert r.get(timeout=10) == 5 and r.status == "SUCCESS"
    r = capp.send_task("tasks.fail", (7,))
    with pytest.raises(ValueError) as info:
        r.get(timeout=10)
    assert info.value.args == ("bad value", 7)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    r = capp.send_task("tasks.structured", (when,))
    assert r.get(timeout=10) == {"when": when, "items": [1, "two", [3.5, None]], "ok": True}
    # what celeriac's worker stored, Celery reads; and celeriac reads it too
    tasks = importlib.import_module("tasks")
    ours = tasks.app.AsyncResult(r.id)
    assert ours.get(timeout=1)["when"] == when
    assert [h["state"] for h in ours.history] == ["RECEIVED", "STARTED", "SUCCESS"]


def test_celery_sees_celeriac_custom_states(project, env, workers, redis_url):
    write_module(project, "tasks", CELERIAC_TASKS.replace(
        "self.update_state(state='PROGRESS', meta={'x': x})",
        "self.update_state(state='PROGRESS', meta={'x': x}); time.sleep(1.0)"))
    importlib.import_module("tasks")
    workers.append(Worker(project, "tasks", env=env))
    capp = _celery_client(redis_url)
    r = capp.send_task("tasks.add", (4, 5))
    seen = set()
    deadline = time.monotonic() + 10
    while r.state != "SUCCESS" and time.monotonic() < deadline:
        seen.add(r.state)
        if r.state == "PROGRESS":
            assert r.info == {"x": 4}
        time.sleep(0.02)
    assert "PROGRESS" in seen and r.result == 9


def test_celeriac_producer_celery_worker(project, env, workers, redis_url):
    write_module(project, "ctasks", CELERY_TASKS)
    workers.append(CeleryWorker(project, "ctasks", env=env))
    app = importlib.import_module("celeriac").Celery("producer", broker=redis_url)
    r = app.send_task("tasks.add", (2, 3))
    assert r.get(timeout=15) == 5
    assert r.state == states.SUCCESS
    r = app.send_task("tasks.fail", (7,))
    with pytest.raises(ValueError) as info:
        r.get(timeout=15)
    assert info.value.args == ("bad value", 7) and "ValueError" in r.traceback
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    r = app.send_task("tasks.structured", (when,))
    assert r.get(timeout=15) == {"when": when, "items": [1, "two", [3.5, None]], "ok": True}
    # celeriac's own record of sending is beside what Celery's worker stored
    assert r.history[0]["state"] == states.PENDING


def test_celery_and_celeriac_workers_share_one_queue(project, env, workers, redis_url):
    tasks = _celeriac(project)
    write_module(project, "ctasks", CELERY_TASKS)
    workers.append(CeleryWorker(project, "ctasks", env=env))
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    rs = [tasks.nap.delay(i) for i in range(60)]
    assert [r.get(timeout=30) for r in rs] == [2 * i for i in range(60)]
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 5  # a result is written just before its ack
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.llen("celery") == 0 and client.hlen("unacked") == 0
    # celeriac's worker records RECEIVED; Celery's worker records no history
    by_celeriac = sum(states.RECEIVED in [h["state"] for h in r.history] for r in rs)
    assert 0 < by_celeriac < 60


def test_a_dead_workers_message_is_restored_after_the_visibility_timeout(
        project, env, workers, redis_url):
    tasks = _celeriac(project)
    w = Worker(project, "tasks", env=dict(env, VT="2"), concurrency=1)
    r = tasks.slow.delay(1.0)
    deadline = time.monotonic() + 10
    while r.state != states.STARTED and time.monotonic() < deadline:
        time.sleep(0.01)
    w.kill_all()
    client = redis.Redis.from_url(redis_url)
    assert client.hlen("unacked") == 1
    workers.append(Worker(project, "tasks", env=dict(env, VT="2"), concurrency=1))
    assert r.get(timeout=20) == "slept"
    deadline = time.monotonic() + 5
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.hlen("unacked") == 0


def test_warm_shutdown_gives_back_every_held_message_while_a_peer_is_busy(
        project, env, workers, redis_url):
    """A worker holding many prefetched messages is stopped while a busy peer takes and
    acks all the time (touching ``unacked`` on every step): every held message goes back
    to the queue at once, none is left to the visibility timeout (an hour here)."""
    tasks = _celeriac(project)
    client = redis.Redis.from_url(redis_url)
    holder = Worker(project, "tasks", env=dict(env, PREFETCH="200"), concurrency=1)
    workers.append(holder)
    rs = [tasks.nap.delay(i) for i in range(400)]
    deadline = time.monotonic() + 60
    while client.hlen("unacked") < 100:  # the holder took a big batch
        assert time.monotonic() < deadline, client.hlen("unacked")
        time.sleep(0.01)
    peer = Worker(project, "tasks", env=dict(env, PREFETCH="1"), concurrency=2)
    workers.append(peer)
    peer.wait_for_log("succeeded", count=5)
    assert holder.stop() == 0
    waiting = list(rs)
    deadline = time.monotonic() + 90  # an hour if one were left in unacked
    while waiting:
        assert time.monotonic() < deadline, (f"{len(waiting)} never ran", {
            r.state for r in waiting}, client.hlen("unacked"), client.llen("celery"))
        waiting = [r for r in waiting if r.state != states.SUCCESS]
        time.sleep(0.1)
    assert [r.result for r in rs] == [2 * i for i in range(400)]
    deadline = time.monotonic() + 20  # a result is written just before its ack
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.hlen("unacked") == 0 and client.hlen("celeriac.unacked_node") == 0


def test_redis_purge_and_priorities(project, env, redis_url):
    tasks = _celeriac(project)
    for p in (0, 5, 9):
        tasks.add.apply_async((1, 1), priority=p)
    client = redis.Redis.from_url(redis_url)
    assert client.llen("celery") == 1 and client.llen("celery\x06\x163") == 1
    assert client.llen("celery\x06\x169") == 1
    assert tasks.app.broker.purge(["celery"]) == 3
    assert os.environ["TEST_REDIS_URL"] == redis_url


def test_worker_survives_a_lost_connection(project, env, workers, redis_url):
    tasks = _celeriac(project)
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    client = redis.Redis.from_url(redis_url)
    rs = [tasks.add.delay(i, 0) for i in range(20)]
    db = client.connection_pool.connection_kwargs["db"]
    killed = 0
    for c in client.client_list():  # every connection to this test's database, no other
        if int(c["db"]) == db and c["id"] != str(client.client_id()):
            killed += client.client_kill_filter(_id=c["id"])
    assert killed >= 3  # the worker's, and this process's producer and result connections
    rs += [tasks.add.delay(i, 0) for i in range(20, 40)]
    assert [r.get(timeout=30) for r in rs] == list(range(40))


def test_global_keyprefix_is_shared_with_celery(redis_url):
    """result_backend_transport_options={'global_keyprefix': ...}: keys and the channel
    get the prefix, as in Celery, and each side reads what the other stored."""
    import celeriac

    options = {"global_keyprefix": "pfx_"}
    ours = celeriac.Celery(broker=redis_url, backend=redis_url,
                           result_backend_transport_options=options)
    theirs = celery.Celery(broker=redis_url, backend=redis_url)
    theirs.conf.result_backend_transport_options = options
    client = redis.Redis.from_url(redis_url)
    ours.backend.store("prefixed-1", states.SUCCESS, {"n": 1})
    assert client.exists("pfx_celery-task-meta-prefixed-1")
    assert not client.exists("celery-task-meta-prefixed-1")
    assert theirs.AsyncResult("prefixed-1").get(timeout=5) == {"n": 1}
    theirs.backend.store_result("prefixed-2", [2], states.SUCCESS)
    assert ours.AsyncResult("prefixed-2").get(timeout=5) == [2]
