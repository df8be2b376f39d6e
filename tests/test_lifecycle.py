"""Task lifecycle with real workers on each broker: retries (explicit and automatic),
Reject and Ignore; and retry messages crossing between celeriac and Celery 5.7 workers."""

from __future__ import annotations

import contextlib
import importlib
import time

import pytest

from celeriac import states
from celeriac.exceptions import MaxRetriesExceededError, Reject

from .conftest import AMQP_URL, CeleryWorker, Worker, amqp_connection, write_module

TASKS = """
import os
from celeriac import Celery
from celeriac.exceptions import Ignore, Reject

app = Celery('ltasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task(bind=True, max_retries=3, default_retry_delay=0.2)
def flaky(self, succeed_on):
    if self.request.retries < succeed_on:
        raise self.retry(exc=KeyError(f'attempt {self.request.retries}'))
    return self.request.retries


@app.task(bind=True, max_retries=2)
def hopeless(self):
    raise self.retry(exc=ValueError('still broken'), countdown=0.1)


@app.task(bind=True, max_retries=1)
def no_reason(self):
    raise self.retry(countdown=0.1)


@app.task(autoretry_for=(ZeroDivisionError,), retry_kwargs={'max_retries': 2, 'countdown': 0.1})
def divide(x):
    return 1 / x


@app.task(bind=True)
def new_args(self, x):
    if self.request.retries == 0:
        raise self.retry(args=[x * 10], countdown=0)
    return x


@app.task
def ignored():
    raise Ignore()


@app.task(acks_late=True)
def rejected():
    raise Reject('bad input', requeue=False)


@app.task(acks_late=True)
def requeued(path):
    if not os.path.exists(path):
        open(path, 'w').close()
        raise Reject('not yet', requeue=True)
    return 'second time'
"""


@pytest.fixture
def tasks(broker_env, project, workers):
    write_module(project, "ltasks", TASKS)
    module = importlib.import_module("ltasks")
    workers.append(Worker(project, "ltasks", env=broker_env, concurrency=2))
    return module


def _states(result):
    return [h["state"] for h in result.history]


def test_retry_runs_again_with_the_same_id_until_it_succeeds(tasks):
    r = tasks.flaky.delay(2)
    assert r.get(timeout=20) == 2
    history = r.history
    assert _states(r).count(states.RETRY) == 2
    assert _states(r).count(states.RECEIVED) == 3
    retries = [h for h in history if h["state"] == states.RETRY]
    assert [h["meta"]["exc_type"] for h in retries] == ["KeyError", "KeyError"]
    assert [h["meta"]["exc_message"] for h in retries] == [["attempt 0"], ["attempt 1"]]
    assert [h["meta"]["retries"] for h in retries] == [1, 2]
    received = [h["meta"] for h in history if h["state"] == states.RECEIVED]
    assert received == [None, {"retries": 1}, {"retries": 2}]
    assert _states(r)[-1] == states.SUCCESS


def test_when_retries_run_out_the_original_exception_is_raised(tasks):
    r = tasks.hopeless.delay()
    with pytest.raises(ValueError, match="still broken"):
        r.get(timeout=20)
    assert _states(r).count(states.RETRY) == 2  # max_retries=2: three runs in all
    assert r.state == states.FAILURE


def test_without_an_exception_max_retries_exceeded_is_raised(tasks):
    r = tasks.no_reason.delay()
    with pytest.raises(MaxRetriesExceededError):
        r.get(timeout=20)
    assert _states(r).count(states.RETRY) == 1


def test_autoretry_for(tasks):
    assert tasks.divide.delay(4).get(timeout=20) == 0.25
    r = tasks.divide.delay(0)
    with pytest.raises(ZeroDivisionError):
        r.get(timeout=20)
    assert _states(r).count(states.RETRY) == 2


def test_retry_with_new_arguments(tasks):
    assert tasks.new_args.delay(3).get(timeout=20) == 30


def test_ignore_stores_nothing_more_and_the_worker_goes_on(tasks):
    r = tasks.ignored.delay()
    assert tasks.flaky.delay(0).get(timeout=20) == 0  # the worker is not stuck
    deadline = time.monotonic() + 10
    while states.RECEIVED not in _states(r):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert r.state == states.PENDING
    assert _states(r) == [states.PENDING, states.RECEIVED]


def test_reject_without_requeue_is_a_failure(tasks):
    r = tasks.rejected.delay()
    with pytest.raises(Reject):
        r.get(timeout=20)
    assert r.state == states.FAILURE


def test_reject_with_requeue_runs_the_task_again(tasks, project):
    r = tasks.requeued.delay(str(project / "requeued-once"))
    assert r.get(timeout=20) == "second time"
    assert _states(r).count(states.RECEIVED) == 2
    assert states.FAILURE not in _states(r)


# --------------------------------------------------------------------------- with Celery

CELERIAC_HOP = """
import os
from celeriac import Celery

app = Celery('hop', broker=os.environ['TEST_BROKER'], backend=os.environ['TEST_BACKEND'])
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task(bind=True, name='hop.hop', max_retries=3)
def hop(self, x):
    if self.request.retries == 0:
        raise self.retry(exc=KeyError('first'), countdown=0.1,
                         queue=os.environ['TEST_QUEUE'] + '-next')
    return ['celeriac', x, self.request.retries]
"""

CELERY_HOP = CELERIAC_HOP.replace("from celeriac import Celery", "from celery import Celery")
CELERY_HOP = CELERY_HOP.replace("['celeriac', x", "['celery', x").replace("'hop',", "'chop',")


@pytest.mark.parametrize("first", ["celeriac", "celery"])
def test_a_retry_crosses_between_celery_and_celeriac_workers(project, redis_url, monkeypatch,
                                                             workers, first):
    """The first attempt runs on one project's worker, which retries into a second queue
    that only the other project's worker consumes: the retry message one writes, the
    other runs (same id, retries=1), and either side reads the whole story."""
    queue = f"hop-{first}"
    env = {"TEST_BROKER": redis_url, "TEST_BACKEND": redis_url, "TEST_QUEUE": queue}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    write_module(project, "hop", CELERIAC_HOP)
    write_module(project, "chop", CELERY_HOP)
    hop = importlib.import_module("hop")
    second = "celery" if first == "celeriac" else "celeriac"
    for side, q in ((first, queue), (second, f"{queue}-next")):
        side_env = dict(env, TEST_QUEUE=q)
        if side == "celeriac":
            workers.append(Worker(project, "hop", env=side_env, concurrency=1))
        else:
            workers.append(CeleryWorker(project, "chop", env=side_env))
    # the retry goes to TEST_QUEUE + '-next' as the first worker sees TEST_QUEUE
    r = hop.hop.delay(7)
    assert r.get(timeout=30) == [second, 7, 1]
    # a Celery worker writes the meta but keeps no history
    if first == "celeriac":
        assert _states(r) == [states.PENDING, states.RECEIVED, states.RETRY]
    else:
        assert _states(r) == [states.PENDING, states.RECEIVED, states.SUCCESS]
        assert r.history[1]["meta"] == {"retries": 1}
    import celery

    capp = celery.Celery(broker=redis_url, backend=redis_url)
    assert capp.AsyncResult(r.id).get(timeout=5) == [second, 7, 1]


# --------------------------------------------------------------------------- ETA on Redis

ETA_TASKS = """
import os
from celeriac import Celery

app = Celery('etasks', broker=os.environ['TEST_BROKER'])
app.conf.broker_transport_options = {'visibility_timeout': 1}


@app.task(name='etasks.mark')
def mark(path, tag):
    with open(path, 'a') as f:
        f.write(tag + '\\n')
    return tag
"""


def _delayed(client):
    from celeriac.brokers.redis import delayed_key

    return client.zcard(delayed_key("celery"))


def test_redis_eta_waits_in_the_broker_and_runs_once(project, redis_url, monkeypatch,
                                                     workers):
    """kombu#337: with Celery a task whose ETA is further off than the visibility
    timeout (1 s here) is handed out again and runs several times.  celeriac parks it
    in a sorted set: not held, not in the worker's memory, run once, on time."""
    import redis

    monkeypatch.setenv("TEST_BROKER", redis_url)
    write_module(project, "etasks", ETA_TASKS)
    etasks = importlib.import_module("etasks")
    client = redis.Redis.from_url(redis_url)
    w = Worker(project, "etasks", env={"TEST_BROKER": redis_url}, concurrency=2)
    workers.append(w)
    log = project / "ran.log"
    sent = time.time()
    rs = [etasks.mark.apply_async((str(log), str(i)), countdown=4) for i in range(50)]
    deadline = time.monotonic() + 10
    while _delayed(client) < 50:
        assert time.monotonic() < deadline, w.log
        time.sleep(0.05)
    assert client.hlen("unacked") == 0  # nothing held while it waits
    assert [r.get(timeout=20) for r in rs] == [str(i) for i in range(50)]
    assert time.time() - sent >= 4
    assert sorted(log.read_text().split()) == sorted(str(i) for i in range(50))  # once each
    assert _delayed(client) == 0


def test_redis_eta_from_a_celery_producer_is_parked_too(project, redis_url, monkeypatch,
                                                        workers):
    import celery
    import redis

    write_module(project, "etasks", ETA_TASKS)
    capp = celery.Celery(broker=redis_url, backend=redis_url)
    client = redis.Redis.from_url(redis_url)
    w = Worker(project, "etasks", env={"TEST_BROKER": redis_url}, concurrency=1)
    workers.append(w)
    log = project / "ran.log"
    r = capp.send_task("etasks.mark", (str(log), "from-celery"), countdown=3)
    deadline = time.monotonic() + 10
    while _delayed(client) < 1:
        assert time.monotonic() < deadline, w.log
        time.sleep(0.05)
    assert not log.exists()
    assert r.get(timeout=20) == "from-celery"
    assert log.read_text().split() == ["from-celery"]


def test_rabbitmq_eta_waits_in_delay_queues_and_runs_once(project, amqp_queue, redis_url,
                                                          monkeypatch, workers):
    """On RabbitMQ a far ETA goes through celeriac.delay.<n> queues (fixed TTLs that
    dead-letter back to the task's queue) instead of waiting unacked in the worker."""
    import amqp

    env = {"TEST_BROKER": AMQP_URL, "TEST_BACKEND": redis_url, "TEST_QUEUE": amqp_queue}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    write_module(project, "etasks", ETA_TASKS.replace(
        "app.conf.broker_transport_options = {'visibility_timeout': 1}",
        "app.conf.update(result_backend=os.environ['TEST_BACKEND'], "
        "task_default_queue=os.environ['TEST_QUEUE'])"))
    etasks = importlib.import_module("etasks")
    w = Worker(project, "etasks", env=env, concurrency=1)
    workers.append(w)
    log = project / "ran.log"
    sent = time.time()
    rs = [etasks.mark.apply_async((str(log), str(i)), countdown=5) for i in range(20)]
    w.wait_for_log("kept in the broker until then", count=20)
    conn = amqp_connection()
    parked = 0
    try:
        for n in range(4):
            with contextlib.suppress(amqp.exceptions.NotFound):
                parked += conn.channel().queue_declare(f"celeriac.delay.{n}",
                                                       passive=True).message_count
    finally:
        conn.close()
    assert parked == 20
    assert not log.exists()
    assert [r.get(timeout=30) for r in rs] == [str(i) for i in range(20)]
    assert time.time() - sent >= 5
    assert sorted(log.read_text().split()) == sorted(str(i) for i in range(20))
