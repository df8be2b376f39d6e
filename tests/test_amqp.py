"""RabbitMQ: celeriac alone (the seed program with amqp:// as written), and mixed with
real Celery 5.7 producers and workers on the same queue."""

from __future__ import annotations

import importlib
import json
import time

import celery
import pytest

from celeriac import states

from .conftest import AMQP_URL, CeleryWorker, Worker, amqp_connection, write_module

CELERIAC_TASKS = """
import os, time
from celeriac import Celery

app = Celery('tasks', broker=os.environ['TEST_AMQP_URL'], backend=os.environ['TEST_BACKEND'])
app.conf.update(task_track_started=True, task_default_queue=os.environ['TEST_QUEUE'])


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
    raise KeyError(value)


@app.task
def sleepy(seconds, tag=None):
    time.sleep(seconds)
    return tag


@app.task(acks_late=True)
def slow(seconds):
    time.sleep(seconds)
    return 'slept'


@app.task(acks_late=True)
async def long_nap(seconds, path):
    import asyncio
    with open(path, 'a') as f:
        f.write('start\\n')
    await asyncio.sleep(seconds)
    return 'done'
"""

CELERY_TASKS = """
import os
from celery import Celery

app = Celery('tasks', broker=os.environ['TEST_AMQP_URL'], backend=os.environ['TEST_BACKEND'])
app.conf.update(task_track_started=True, task_default_queue=os.environ['TEST_QUEUE'])


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
    raise KeyError(value)
"""


@pytest.fixture
def env(project, amqp_queue, redis_url, monkeypatch):
    values = {"TEST_AMQP_URL": AMQP_URL, "TEST_BACKEND": redis_url, "TEST_QUEUE": amqp_queue}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def _celeriac(project):
    write_module(project, "tasks", CELERIAC_TASKS)
    return importlib.import_module("tasks")


def test_seed_program_on_rabbitmq_with_file_results(project, amqp_queue, workers):
    """The seed's third program: broker='amqp://guest:guest@localhost:5672//' as written."""
    results = project / "results"
    write_module(project, "task", f"""
        from celeriac import Celery
        app = Celery('task', broker='amqp://guest:guest@localhost:5672//')
        app.conf.update(task_track_started=True,
                        result_backend='file://{results}',
                        task_default_queue='{amqp_queue}')

        @app.task(bind=True)
        def add(self, x, y):
            import time
            time.sleep(0.5)
            return x + y
    """)
    task = importlib.import_module("task")
    r = task.add.delay(1, 1)
    time.sleep(0.2)
    assert r.status == "PENDING" and r.exists()
    workers.append(Worker(project, "task"))
    seen = set()
    while not r.ready():
        seen.add(r.status)
        time.sleep(0.02)
    assert "STARTED" in seen and r.get(timeout=5) == 2
    meta = json.loads((results / f"celery-task-meta-{r.id}").read_bytes())
    assert meta["status"] == "SUCCESS" and meta["result"] == 2


def test_celery_producer_celeriac_worker(project, env, workers):
    _celeriac(project)
    workers.append(Worker(project, "tasks", env=env))
    capp = celery.Celery("client", broker=AMQP_URL, backend=env["TEST_BACKEND"])
    capp.conf.task_default_queue = env["TEST_QUEUE"]
    r = capp.send_task("tasks.add", (2, 3))
    assert r.get(timeout=10) == 5
    with pytest.raises(KeyError):
        capp.send_task("tasks.fail", ("k",)).get(timeout=10)
    ours = importlib.import_module("tasks").app.AsyncResult(r.id)
    assert [h["state"] for h in ours.history] == ["RECEIVED", "STARTED", "PROGRESS", "SUCCESS"]


def test_celeriac_producer_celery_worker(project, env, workers):
    write_module(project, "ctasks", CELERY_TASKS)
    workers.append(CeleryWorker(project, "ctasks", env=env))
    app = importlib.import_module("celeriac").Celery(
        "producer", broker=AMQP_URL, backend=env["TEST_BACKEND"],
        task_default_queue=env["TEST_QUEUE"])
    r = app.send_task("tasks.add", (2, 3))
    assert r.get(timeout=15) == 5 and r.state == states.SUCCESS
    with pytest.raises(KeyError):
        app.send_task("tasks.fail", ("k",)).get(timeout=15)


def test_celery_and_celeriac_workers_share_one_queue(project, env, workers):
    tasks = _celeriac(project)
    write_module(project, "ctasks", CELERY_TASKS)
    workers.append(CeleryWorker(project, "ctasks", env=env))
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    rs = [tasks.nap.delay(i) for i in range(60)]
    assert [r.get(timeout=30) for r in rs] == [2 * i for i in range(60)]
    by_celeriac = sum(states.RECEIVED in [h["state"] for h in r.history] for r in rs)
    assert 0 < by_celeriac < 60


def test_long_tasks_spread_over_processes(project, env, workers):
    from collections import Counter

    tasks = _celeriac(project)
    rs = [tasks.sleepy.delay(1.0, i) for i in range(4)]
    workers.append(Worker(project, "tasks", env=env, concurrency=2))
    assert [r.get(timeout=20) for r in rs] == [0, 1, 2, 3]
    assert sorted(Counter(r.history[-1]["pid"] for r in rs).values()) == [2, 2]


def test_unacked_message_of_a_killed_worker_is_delivered_again(project, env, workers):
    tasks = _celeriac(project)
    w = Worker(project, "tasks", env=env, concurrency=1)
    r = tasks.slow.delay(1.0)
    deadline = time.monotonic() + 10
    while r.state != states.STARTED and time.monotonic() < deadline:
        time.sleep(0.01)
    w.kill_all()
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    assert r.get(timeout=20) == "slept"
    assert [h["state"] for h in r.history].count(states.RECEIVED) == 2


SEED_STATES = """
import os
from celeriac import Celery

app = Celery('task', broker='amqp://guest:guest@localhost:5672//')
# STARTED state is not enabled by default so we flip it on
app.conf.update(task_track_started=True, task_default_queue=os.environ['TEST_QUEUE'])


@app.task(bind=True)
def add(self, x, y):
    self.update_state(state='GOING_TO_SLEEP')
    import time
    time.sleep(0.6)
    return x + y
"""


def test_seed_programs_on_rabbitmq_without_a_result_backend(project, env, workers):
    """No result_backend: rpc:// is the default with RabbitMQ, and the post's states show."""
    write_module(project, "task", SEED_STATES)
    task = importlib.import_module("task")
    assert task.app.result_backend_url == "rpc://"
    r = task.add.delay(2, 3)
    time.sleep(0.2)
    assert r.status == "PENDING" and r.exists()
    workers.append(Worker(project, "task", env=env))
    seen = []
    while not r.ready():
        if not seen or seen[-1] != r.status:
            seen.append(r.status)
        time.sleep(0.01)
    assert "GOING_TO_SLEEP" in seen and r.get(timeout=5) == 5
    assert [h["state"] for h in r.history] == [
        "PENDING", "RECEIVED", "STARTED", "GOING_TO_SLEEP", "SUCCESS"]
    bad = task.add.delay(2, "a")
    with pytest.raises(TypeError, match="unsupported operand"):
        bad.get(timeout=10)
    assert bad.state == "FAILURE" and "TypeError" in bad.traceback


def test_rpc_results_cross_with_celery(project, env, workers):
    rpc_env = dict(env, TEST_BACKEND="rpc://")
    write_module(project, "tasks", CELERIAC_TASKS)
    workers.append(Worker(project, "tasks", env=rpc_env))
    capp = celery.Celery("client", broker=AMQP_URL, backend="rpc://")
    capp.conf.task_default_queue = env["TEST_QUEUE"]
    r = capp.send_task("tasks.add", (2, 3))  # Celery client, celeriac worker
    assert r.get(timeout=10) == 5 and r.status == "SUCCESS"
    with pytest.raises(KeyError):
        capp.send_task("tasks.fail", ("k",)).get(timeout=10)

    write_module(project, "ctasks", CELERY_TASKS)
    q2 = env["TEST_QUEUE"] + "-c"
    workers.append(CeleryWorker(project, "ctasks", env=dict(rpc_env, TEST_QUEUE=q2)))
    app = importlib.import_module("celeriac").Celery(
        "producer", broker=AMQP_URL, backend="rpc://", task_default_queue=q2)
    r = app.send_task("tasks.add", (4, 5))  # celeriac client, Celery worker
    assert r.get(timeout=15) == 9
    assert [h["state"] for h in r.history][0] == "PENDING"
    assert "SUCCESS" in [h["state"] for h in r.history]
    conn = amqp_connection()
    conn.channel().queue_delete(q2)
    conn.close()


def test_priority_queues_declared_as_celery_declares_them(project, env, workers):
    """A queue Celery declared with x-max-priority: celeriac declares it the same way
    (a different declaration would be refused by RabbitMQ), in both directions."""
    q = env["TEST_QUEUE"]
    queues = (f"from kombu import Queue\n"
              f"app.conf.task_queues = [Queue('{q}', routing_key='{q}', "
              f"queue_arguments={{'x-max-priority': 10}})]\n")
    write_module(project, "ctasks", CELERY_TASKS + queues)
    write_module(project, "tasks", CELERIAC_TASKS + queues)
    tasks = importlib.import_module("tasks")
    workers.append(CeleryWorker(project, "ctasks", env=env))
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    rs = [tasks.add.apply_async((i, i), priority=i % 10) for i in range(20)]
    assert [r.get(timeout=20) for r in rs] == [2 * i for i in range(20)]


@pytest.fixture
def own_vhost(env, monkeypatch):
    """A RabbitMQ virtual host of this test's own (deleted afterwards): what the test does
    to its connections touches no one else's."""
    import subprocess
    import uuid

    vhost = f"celeriac-test-{uuid.uuid4().hex[:8]}"

    def ctl(*args: str) -> None:
        out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr

    ctl("add_vhost", vhost)
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = AMQP_URL[:AMQP_URL.index("/", AMQP_URL.index("//") + 2)] + "/" + vhost
    monkeypatch.setenv("TEST_AMQP_URL", url)
    env["TEST_AMQP_URL"] = url
    yield vhost
    ctl("delete_vhost", vhost)


def test_worker_and_producer_survive_a_lost_connection(project, env, own_vhost, workers):
    import subprocess

    tasks = _celeriac(project)
    w = Worker(project, "tasks", env=env, concurrency=1)
    workers.append(w)
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    rs = [tasks.sleepy.delay(0.05, i) for i in range(20)]
    out = subprocess.run(["rabbitmqctl", "close_all_connections", "--vhost", own_vhost,
                          "test: connection lost"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rs += [tasks.sleepy.delay(0.05, i) for i in range(20, 40)]  # the producer reconnects
    assert [r.get(timeout=60) for r in rs] == list(range(40))


def test_a_burst_without_publisher_confirms(project, env, workers):
    """confirm_publish=False (kombu's option): delay() does not wait, the worker gets a
    burst; every task still runs (this once lost a wake-up of the worker's writer)."""
    tasks = _celeriac(project)
    tasks.app.conf.broker_transport_options = {"confirm_publish": False}
    tasks.app.close()
    workers.append(Worker(project, "tasks", env=env, concurrency=2))
    rs = [tasks.sleepy.delay(0, i) for i in range(300)]
    assert [r.get(timeout=30) for r in rs] == list(range(300))
    # delay() writes the "sent" entry while it publishes: it still comes first
    for r in rs:
        assert [h["state"] for h in r.history][:2] == [states.PENDING, states.RECEIVED]


def test_acks_of_later_deliveries_never_cover_an_earlier_running_one(project, env, workers):
    """Acks go out as one ``multiple`` frame where RabbitMQ allows.  An async acks_late
    task still running holds the lowest delivery tag while later tasks finish and are
    acked: those acks must not cover it, so when the worker is killed RabbitMQ still
    has it and the next worker runs it."""
    tasks = _celeriac(project)
    marker = project / "long-nap.log"
    w = Worker(project, "tasks", env=env, concurrency=1)
    workers.append(w)
    long = tasks.long_nap.delay(3, str(marker))
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert time.monotonic() < deadline, w.log
        time.sleep(0.02)
    assert [tasks.slow.delay(0).get(timeout=10) for _ in range(5)] == ["slept"] * 5
    rs = [tasks.slow.delay(0) for _ in range(20)]
    assert [r.get(timeout=10) for r in rs] == ["slept"] * 20
    assert long.state == states.STARTED
    w.kill_all()
    workers.append(Worker(project, "tasks", env=env, concurrency=1))
    assert long.get(timeout=20) == "done"
    assert marker.read_text() == "start\nstart\n"
