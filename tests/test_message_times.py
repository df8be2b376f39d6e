"""``eta`` and ``expires`` headers from other producers, naive ones included, are read as
Celery 5.7's worker reads them (a naive value is UTC, whatever the app's time zone)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import celery
import pytest

from celeriac import states

from .conftest import Worker, write_module

TASKS = """
import os, time
from celeriac import Celery

app = Celery('stamps', broker=os.environ['TEST_BROKER'], backend=os.environ['TEST_BROKER'])
app.conf.update(timezone='Asia/Tokyo', enable_utc=False)

@app.task(name='stamps.when')
def when():
    return time.time()
"""


def _naive_utc(seconds: float) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(tzinfo=None)


@pytest.mark.server
def test_naive_eta_and_expires_from_a_celery_producer(project, workers, redis_url,
                                                      monkeypatch):
    monkeypatch.setenv("TEST_BROKER", redis_url)
    write_module(project, "stamps", TASKS)
    import stamps

    workers.append(Worker(project, "stamps"))
    producer = celery.Celery("producer", broker=redis_url)
    producer.conf.update(timezone="Asia/Tokyo", enable_utc=False)

    def send(**options):
        sent = producer.send_task("stamps.when", **options)
        return stamps.app.AsyncResult(sent.id)

    eta = _naive_utc(3)
    delayed = send(eta=eta)
    past = send(expires=_naive_utc(-60))
    future = send(expires=_naive_utc(3600))  # in the past if read as Tokyo's local time
    # a naive eta is UTC: not run before it (nor 9 hours late, as Tokyo's time)
    ran_at = delayed.get(timeout=120)
    assert ran_at >= eta.replace(tzinfo=UTC).timestamp()
    assert future.get(timeout=120) <= time.time()
    past_meta = past.backend.wait(past.id, 120)
    assert past_meta["status"] == states.REVOKED
