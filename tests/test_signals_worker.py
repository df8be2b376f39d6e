"""Celery's signals sent by real celeriac workers and producers, compared with what a
real Celery 5.7 worker and producer send for the same tasks on the same broker: the same
signals, in the same order for each task, from the same kind of sender, with the same
keyword arguments (values compared by kind: the task, the request, the exception...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CeleryWorker, Worker, wait_until, write_module

MODULE = """
import json
import os
import types

if os.environ['IMPL'] == 'celery':
    from celery import Celery, signals
    from celery.exceptions import Reject
else:
    from celeriac import Celery, signals
    from celeriac.exceptions import Reject

app = Celery('sigtasks', broker=os.environ['TEST_BROKER'], backend=os.environ['TEST_BACKEND'])
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'], worker_prefetch_multiplier=1)
LOG = os.environ['SIGNAL_LOG']
IDS = {}  # task id -> tag, read from the log's before_task_publish entries


def describe(value):
    # what a value is, in terms both packages share
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return 'float'
    if isinstance(value, list | tuple):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, BaseException):
        return 'exception:' + type(value).__name__
    if isinstance(value, types.TracebackType):
        return 'traceback'
    if hasattr(value, 'exception') and hasattr(value, 'traceback'):
        return 'einfo:' + type(value.exception).__name__
    if hasattr(value, 'run') and hasattr(value, 'delay'):
        return 'task:' + value.name
    if hasattr(value, 'id') and (hasattr(value, 'task') or hasattr(value, 'task_name')):
        return 'request:' + str(value.id)
    return 'object'


def record(name):
    def receiver(sender=None, **kwargs):
        kwargs.pop('signal', None)
        entry = {'signal': name, 'sender': describe(sender), 'pid': os.getpid(),
                 'kwargs': {k: describe(v) for k, v in kwargs.items()}}
        with open(LOG, 'a') as f:
            f.write(json.dumps(entry, default=repr) + '\\n')
    getattr(signals, name).connect(receiver, weak=False)


for name in ['before_task_publish', 'after_task_publish', 'task_received', 'task_prerun',
             'task_postrun', 'task_success', 'task_failure', 'task_retry', 'task_revoked',
             'task_unknown', 'task_rejected', 'worker_init', 'worker_process_init',
             'worker_ready', 'worker_shutting_down', 'worker_process_shutdown',
             'worker_shutdown', 'celeryd_init', 'import_modules', 'after_setup_logger',
             'after_setup_task_logger']:
    record(name)


@app.task
def add(x, y):
    return x + y


@app.task
def fails(order):
    raise ValueError('cannot ship', order)


@app.task(bind=True)
def retries(self):
    if self.request.retries < 1:
        raise self.retry(countdown=0.1, exc=KeyError('once'))
    return 'retried'
"""

SEND = """
import sys
import sigtasks
results = [sigtasks.add.delay(2, 3), sigtasks.fails.delay(7), sigtasks.retries.delay(),
           sigtasks.app.send_task('sigtasks.not_a_task', (1,))]
for r in results:
    try:
        r.get(timeout=60)
    except Exception:
        pass
sigtasks.app.control.revoke('revoked-in-advance')
revoked = sigtasks.add.apply_async((1, 1), task_id='revoked-in-advance')
print(' '.join(r.id for r in results))
"""

#: the task signals sent where the task runs, in Celery's order for each task (the
#: consumer's task_received is counted apart: a retry's next delivery may be received
#: before the first attempt's last signal)
TASK_SIGNALS = ("task_prerun", "task_success", "task_failure", "task_retry", "task_postrun",
                "task_revoked", "task_received", "task_unknown", "task_rejected")


def _run(impl: str, project: Path, env: dict[str, str], queue: str) -> list[dict]:
    log = project / f"signals-{impl}.jsonl"
    env = {**env, "IMPL": impl, "SIGNAL_LOG": str(log), "TEST_QUEUE": queue}
    if impl == "celery":
        worker: Worker = CeleryWorker(project, "sigtasks", env=env, pool="prefork")
    else:
        worker = Worker(project, "sigtasks", env=env, concurrency=1)
    try:
        out = subprocess.run([sys.executable, "-c", SEND], cwd=project, env=dict(
            os.environ, **env, PYTHONPATH=str(project)), capture_output=True, text=True,
            timeout=120)
        assert out.returncode == 0, out.stderr
        ids = out.stdout.split()
        wait_until(lambda: any('"task_revoked"' in line and "revoked-in-advance" in line
                               for line in log.read_text().splitlines()),
                   timeout=60, what="the revoked task's signal")
    finally:
        worker.stop()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    names = {ids[0]: "add", ids[1]: "fails", ids[2]: "retries", ids[3]: "unknown",
             "revoked-in-advance": "revoked"}
    return [_normalise(e, names) for e in entries]


def _normalise(entry: dict, names: dict[str, str]) -> dict:
    text = json.dumps(entry)
    for task_id, tag in names.items():
        text = text.replace(task_id, f"<{tag}>")
    return json.loads(text)


def _per_task(entries: list[dict]) -> dict[str, list[tuple]]:
    """``tag -> [(signal, sender, sorted kwargs)]`` for the task signals."""
    found: dict[str, list[tuple]] = {}
    for e in entries:
        if e["signal"] not in TASK_SIGNALS:
            continue
        text = json.dumps(e)
        tags = [t for t in ("add", "fails", "retries", "revoked", "unknown")
                if f"<{t}>" in text]
        if tags:
            found.setdefault(tags[0], []).append(
                (e["signal"], e["sender"], sorted(e["kwargs"].items())))
    return found


@pytest.mark.server
def test_worker_and_producer_signals_match_celerys(project, redis_url):
    write_module(project, "sigtasks", MODULE)
    env = {"TEST_BROKER": redis_url, "TEST_BACKEND": redis_url}
    celery = _run("celery", project, env, "sig-celery")
    ours = _run("celeriac", project, env, "sig-celeriac")
    theirs_by_task, ours_by_task = _per_task(celery), _per_task(ours)
    assert set(ours_by_task) == set(theirs_by_task) == {
        "add", "fails", "retries", "revoked", "unknown"}
    for tag, expected in theirs_by_task.items():
        got = ours_by_task[tag]
        received = [e for e in got if e[0] == "task_received"]
        assert received == [e for e in expected if e[0] == "task_received"], tag
        got = [e for e in got if e[0] != "task_received"]
        expected = [e for e in expected if e[0] != "task_received"]
        assert [s for s, _, _ in got] == [s for s, _, _ in expected], tag
        for (signal, sender, kwargs), (_, their_sender, their_kwargs) in zip(
                got, expected, strict=True):
            if not their_sender.startswith("task:"):  # the worker's consumer: any object
                their_sender = sender if sender == "object" else their_sender
            assert sender == their_sender, (tag, signal)
            assert [k for k, _ in kwargs] == [k for k, _ in their_kwargs], (tag, signal)
            assert _comparable(dict(kwargs)) == _comparable(dict(their_kwargs)), (tag, signal)
    publish = [e for e in ours if e["signal"] in ("before_task_publish", "after_task_publish")]
    celery_publish = [e for e in celery
                      if e["signal"] in ("before_task_publish", "after_task_publish")]
    assert sorted((e["signal"], e["sender"], sorted(e["kwargs"])) for e in publish) == sorted(
        (e["signal"], e["sender"], sorted(e["kwargs"])) for e in celery_publish)
    process_signals = {"worker_init", "worker_process_init", "worker_ready",
                       "worker_shutting_down", "worker_process_shutdown", "worker_shutdown",
                       "celeryd_init", "import_modules", "after_setup_logger",
                       "after_setup_task_logger"}
    assert {e["signal"] for e in ours} & process_signals == {
        e["signal"] for e in celery} & process_signals


def _comparable(kwargs: dict) -> dict:
    """Values both packages give alike; the request object's contents and the exact
    body of a retry's reason differ in detail, so only their kind is compared."""
    out = {}
    for key, value in kwargs.items():
        if key in ("request", "reason", "einfo", "retval") and isinstance(value, str):
            value = value.split(":")[0]
        if key == "runtime":
            value = "float"
        out[key] = value
    return out
