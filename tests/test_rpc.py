"""``rpc://`` results (the default with a RabbitMQ broker) keep a revoke record in
RabbitMQ itself, on a private node of the test's own: a worker that starts after the
revoke, and after a broker restart, never runs the task."""

from __future__ import annotations

import importlib
import time

import pytest

from celeriac import states
from celeriac.exceptions import TaskRevokedError

from .conftest import Worker, write_module

TASKS = """
import os
from celeriac import Celery

app = Celery('rpctasks', broker=os.environ['TEST_BROKER'])


@app.task
def touch(path):
    open(path, 'a').close()
    return 'ran'
"""


def test_a_revoke_holds_with_rpc_results_through_a_broker_restart(
        project, private_rabbit, monkeypatch, workers):
    monkeypatch.setenv("TEST_BROKER", private_rabbit.url)
    write_module(project, "rpctasks", TASKS)
    rpctasks = importlib.import_module("rpctasks")
    assert rpctasks.app.result_backend_url == "rpc://"
    revoked_path, kept_path = project / "revoked", project / "kept"
    r = rpctasks.touch.delay(str(revoked_path))
    r.revoke()  # no worker is up: only the revoke record can stop it
    private_rabbit.stop()
    private_rabbit.start()
    kept = rpctasks.touch.delay(str(kept_path))
    worker = Worker(project, "rpctasks", env={"TEST_BROKER": private_rabbit.url})
    workers.append(worker)
    assert kept.get(timeout=60) == "ran"
    worker.wait_for_log(f"Discarding revoked task: rpctasks.touch[{r.id}]", timeout=60)
    deadline = time.monotonic() + 60
    while r.state != states.REVOKED:  # the worker sends REVOKED to the caller
        assert time.monotonic() < deadline, r.state
        time.sleep(0.05)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    assert kept_path.exists() and not revoked_path.exists()
