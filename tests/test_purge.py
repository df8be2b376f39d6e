"""``celeriac purge`` on each broker drops the messages parked for an ETA too (Redis:
the queue's sorted sets; RabbitMQ: the delay queues; SQLite: rows not yet visible), and
counts them: they never come back."""

from __future__ import annotations

import importlib
import subprocess

import amqp
import pytest
import redis

from celeriac import states
from celeriac.brokers.redis import PRIORITY_STEPS, delayed_key, queue_key

from .conftest import CELERIAC, Worker, amqp_connection, write_module
from .test_poison import wait_until

TASKS = """
import os
from celeriac import Celery

app = Celery('purgetasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'], task_track_started=True)


@app.task
def add(x, y):
    return x + y
"""


def _parked(broker_env) -> int:
    """How many of this test's messages are parked (0 on SQLite: nothing is parked)."""
    url, queue = broker_env["TEST_BROKER"], broker_env["TEST_QUEUE"]
    if url.startswith("redis"):
        client = redis.Redis.from_url(url)
        return sum(client.zcard(delayed_key(queue_key(queue, p))) for p in PRIORITY_STEPS)
    if url.startswith("sqlite"):
        return 0
    conn = amqp_connection()
    count = 0
    try:
        for level in range(28):
            channel = conn.channel()
            try:
                channel.queue_declare(f"celeriac.delay.{level}", passive=True)
            except amqp.exceptions.NotFound:
                continue
            while (m := channel.basic_get(f"celeriac.delay.{level}")) is not None:
                count += m.delivery_info.get("routing_key") == queue
            channel.close()  # hands every one back
    finally:
        conn.close()
    return count


@pytest.fixture
def purgetasks(broker_env, project):
    write_module(project, "purgetasks", TASKS)
    return importlib.import_module("purgetasks")


def test_purge_drops_and_counts_parked_messages(purgetasks, broker_env, project, workers):
    later = [purgetasks.add.apply_async((i, i), countdown=3600) for i in range(3)]
    worker = Worker(project, "purgetasks", env=broker_env, concurrency=1)
    workers.append(worker)
    if not broker_env["TEST_BROKER"].startswith("sqlite"):
        wait_until(lambda: _parked(broker_env) == 3, "three parked messages")
    assert worker.stop() == 0
    waiting = [purgetasks.add.delay(1, 1) for _ in range(2)]

    out = subprocess.run([*CELERIAC, "-A", "purgetasks", "purge", "-f", "-Q",
                          broker_env["TEST_QUEUE"]], cwd=project, env=None,
                         capture_output=True, text=True, check=True)
    assert "Purged 5 messages" in out.stdout, out.stdout + out.stderr
    assert _parked(broker_env) == 0

    workers.append(Worker(project, "purgetasks", env=broker_env, concurrency=1))
    assert purgetasks.add.delay(2, 3).get(timeout=60) == 5
    assert _parked(broker_env) == 0
    assert all(r.state == states.PENDING for r in [*later, *waiting])
