"""Signals at the worker's other lifecycle points, with a real worker on the embedded
store: a receiver that raises breaks nothing; hard time limits, terminate and expiry send
what Celery sends; the app's configure/finalize signals; a before_task_publish receiver
may add headers."""

from __future__ import annotations

import importlib
import json

import pytest

from celeriac import Celery
from celeriac.exceptions import TaskRevokedError, TimeLimitExceeded

from .conftest import Worker, wait_until, write_module

TASKS = """
import json
import os
import time
from celeriac import Celery, signals

app = Celery('lifesig')
LOG = os.path.join(os.getcwd(), 'signals.jsonl')


def note(name, **fields):
    with open(LOG, 'a') as f:
        f.write(json.dumps({'signal': name, **fields}) + '\\n')


@signals.task_prerun.connect
def broken(sender=None, **kwargs):
    raise RuntimeError('a broken receiver')


@signals.task_failure.connect
def failed(sender=None, task_id=None, exception=None, einfo=None, **kwargs):
    note('task_failure', task=sender.name, id=task_id, exception=type(exception).__name__,
         einfo=type(einfo.exception).__name__)


@signals.task_revoked.connect
def revoked(sender=None, request=None, terminated=None, signum=None, expired=None, **kw):
    note('task_revoked', task=sender.name, id=request.id, terminated=terminated,
         signum=signum, expired=expired)


@signals.task_success.connect
def succeeded(sender=None, result=None, **kwargs):
    note('task_success', task=sender.name, result=result)


@app.task
def add(x, y):
    return x + y


@app.task(time_limit=0.5)
def too_long():
    time.sleep(30)


@app.task
def sleeps(seconds):
    time.sleep(seconds)


@app.task(bind=True)
def headers(self):
    return self.request.headers
"""


def _log(project) -> list[dict]:
    path = project / "signals.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_worker_lifecycle_signals(project, workers):
    write_module(project, "lifesig", TASKS)
    tasks = importlib.import_module("lifesig")
    worker = Worker(project, "lifesig", concurrency=1)
    workers.append(worker)
    # a receiver that raises is logged; the task runs on
    assert tasks.add.delay(2, 3).get(timeout=30) == 5
    assert "a broken receiver" in worker.log
    # the hard time limit: task_failure with TimeLimitExceeded, sent by the worker
    limited = tasks.too_long.delay()
    with pytest.raises(TimeLimitExceeded):
        limited.get(timeout=30)
    # terminate: task_revoked with terminated=True and the signal's number
    running = tasks.sleeps.delay(30)
    wait_until(lambda: running.state == "STARTED" or "RECEIVED" in [
        h["state"] for h in running.history], what="the task started")
    running.revoke(terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError):
        running.get(timeout=30)
    # expired before it ran: task_revoked with expired=True
    expired = tasks.add.apply_async((1, 1), expires=-1)
    with pytest.raises(TaskRevokedError):
        expired.get(timeout=30)
    entries = wait_until(lambda: len(found := _log(project)) >= 4 and found,
                         what="four signal entries")
    assert {"signal": "task_success", "task": "lifesig.add", "result": 5} in entries
    assert {"signal": "task_failure", "task": "lifesig.too_long", "id": limited.id,
            "exception": "TimeLimitExceeded", "einfo": "TimeLimitExceeded"} in entries
    assert {"signal": "task_revoked", "task": "lifesig.sleeps", "id": running.id,
            "terminated": True, "signum": 9, "expired": False} in entries
    assert {"signal": "task_revoked", "task": "lifesig.add", "id": expired.id,
            "terminated": False, "signum": None, "expired": True} in entries


def test_before_task_publish_may_add_headers(project, workers):
    from celeriac import signals

    write_module(project, "lifesig", TASKS)
    tasks = importlib.import_module("lifesig")
    workers.append(Worker(project, "lifesig", concurrency=1))

    def add_tenant(sender=None, headers=None, **kwargs):
        headers["tenant"] = "acme"

    signals.before_task_publish.connect(add_tenant)
    try:
        assert tasks.headers.delay().get(timeout=30) == {"tenant": "acme"}
    finally:
        signals.before_task_publish.disconnect(add_tenant)


def test_app_configure_and_finalize_signals(tmp_path):
    """Celery's documented pattern: receivers connected after config_from_object run when
    the settings are first read; on_after_finalize when the registry is first used."""
    seen = []
    app = Celery("confsig", broker="memory://")
    app.config_from_object({"task_default_queue": "q1"})

    @app.on_configure.connect
    def configuring(sender, **kwargs):
        seen.append(("on_configure", sender is app))

    @app.on_after_configure.connect
    def configured(sender, source, **kwargs):
        seen.append(("on_after_configure", source["task_default_queue"]))

    @app.on_after_finalize.connect
    def finalized(sender, **kwargs):
        seen.append(("on_after_finalize", sender is app))

    @app.task
    def noop():
        return None

    assert seen == []
    assert app.conf.task_default_queue == "q1"
    assert app.conf.task_default_queue == "q1"  # once only
    assert "confsig.noop" in app.tasks or any(n.endswith(".noop") for n in app.tasks)
    assert seen == [("on_configure", True), ("on_after_configure", "q1"),
                    ("on_after_finalize", True)]
