"""Hostile messages and the dead-letter store, on each broker: a message that cannot be
decoded at all (headers nested a thousand deep: RecursionError) is set aside on its own
with a reason while the messages taken in the same batch run; and the dead letters are
kept within their configured cap."""

from __future__ import annotations

import importlib
import sys
import time
import uuid

import pytest
import redis

from celeriac.brokers.sqlite import _INSERT
from celeriac.protocol import build_task_message, encode_envelope

from .conftest import Worker, amqp_connection, write_module

TASKS = """
import os
from celeriac import Celery

app = Celery('poisontasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None,
             broker_transport_options={
                 'dead_letter_limit': int(os.environ.get('DEAD_LIMIT', 10000))})
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task
def add(x, y):
    return x + y
"""

DEPTH = 1000


def wait_until(check, what, timeout=60.0):
    """The value of ``check()`` once truthy, polling until ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not seen within {timeout}s"
        time.sleep(0.05)


@pytest.fixture
def poisontasks(broker_env, project):
    write_module(project, "poisontasks", TASKS)
    return importlib.import_module("poisontasks")


def _poison_envelope(queue: str, task_id: str) -> bytes:
    """A task message whose headers hold a list nested DEPTH deep."""
    message = build_task_message("poisontasks.add", (1, 2), {}, task_id=task_id, queue=queue,
                                 serializer="json")
    message.headers["deep"] = "NEST"
    text = encode_envelope(message).decode()
    return text.replace('"NEST"', "[" * DEPTH + "]" * DEPTH).encode()


def _publish_poison(app, broker_env, queue: str, task_id: str) -> None:
    url = broker_env["TEST_BROKER"]
    if url.startswith("sqlite"):
        conn = app.broker.connections.get()
        conn.execute(_INSERT, (queue, 0, time.time(), _poison_envelope(queue, task_id)))
        conn.commit()
    elif url.startswith("redis"):
        redis.Redis.from_url(url).lpush(queue, _poison_envelope(queue, task_id))
    else:
        message = build_task_message("poisontasks.add", (1, 2), {}, task_id=task_id,
                                     queue=queue, serializer="json")
        deep: list = []
        for _ in range(DEPTH):
            deep = [deep]
        message.headers["deep"] = deep
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(20 * DEPTH)  # the client encodes tables recursively
        try:
            app.broker.publish(message)
        finally:
            sys.setrecursionlimit(limit)


def _dead_letters(app, broker_env, queue: str) -> list[tuple[str, str]]:
    """(queue, reason) of the dead letters of ``queue``."""
    url = broker_env["TEST_BROKER"]
    if url.startswith("sqlite"):
        return [(q, reason) for q, reason, _ in app.broker.dead_letters() if q == queue]
    if url.startswith("redis"):
        return [(d["queue"], d["reason"]) for d in app.broker.dead_letters()
                if d["queue"] == queue]
    conn = amqp_connection()
    try:
        channel = conn.channel()
        found, others = [], []
        while True:
            m = channel.basic_get("celeriac.dead_letters", no_ack=False)
            if m is None:
                break
            headers = m.headers or {}
            if headers.get("x-celeriac-queue") == queue:
                found.append((queue, headers.get("x-celeriac-reason")))
                channel.basic_ack(m.delivery_tag)
            else:
                others.append(m.delivery_tag)
        for tag in others:  # another test's: left where it was
            channel.basic_reject(tag, requeue=True)
        return found
    finally:
        conn.close()


def test_a_poison_message_is_set_aside_alone(poisontasks, broker_env, project, workers):
    queue = broker_env["TEST_QUEUE"]
    app = poisontasks.app
    first = poisontasks.add.delay(1, 1)
    poison_id = str(uuid.uuid4())
    _publish_poison(app, broker_env, queue, poison_id)
    last = poisontasks.add.delay(2, 2)
    # started after all three wait, so one fetch takes them together
    worker = Worker(project, "poisontasks", env=broker_env, concurrency=1)
    workers.append(worker)
    assert first.get(timeout=60) == 2
    assert last.get(timeout=60) == 4
    dead = wait_until(lambda: _dead_letters(app, broker_env, queue), "the dead letter")
    assert len(dead) == 1 and "undecodable message" in dead[0][1], dead
    if broker_env["TEST_BROKER"].startswith("amqp"):  # its id is readable there
        assert app.AsyncResult(poison_id).state == "FAILURE"
    assert worker.proc.poll() is None
    assert poisontasks.add.delay(3, 3).get(timeout=60) == 6  # and it goes on
    assert worker.stop() == 0


@pytest.mark.parametrize("broker_env", ["sqlite", "redis"], indirect=True)
def test_dead_letters_keep_within_their_cap(poisontasks, broker_env, project, workers,
                                            monkeypatch):
    """With ``dead_letter_limit`` 3, setting six messages aside keeps the newest three."""
    monkeypatch.setenv("DEAD_LIMIT", "3")
    queue = broker_env["TEST_QUEUE"]
    app = poisontasks.app
    ids = [str(uuid.uuid4()) for _ in range(6)]
    for task_id in ids:
        _publish_poison(app, broker_env, queue, task_id)
    worker = Worker(project, "poisontasks", env=dict(broker_env, DEAD_LIMIT="3"),
                    concurrency=1)
    workers.append(worker)
    worker.wait_for_log("set aside", count=6, timeout=60)
    assert poisontasks.add.delay(3, 3).get(timeout=60) == 6
    dead = _dead_letters(app, broker_env, queue)
    assert len(dead) == 3, dead
    assert worker.stop() == 0
