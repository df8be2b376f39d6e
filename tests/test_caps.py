"""What the stores and the worker keep is bounded: the revoked ids (REVOKES_MAX) and the
histories of tasks no worker ever took (result_expires)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from celeriac import Celery, control, states
from celeriac.backends.base import Record, history_entry
from celeriac.protocol import new_id
from celeriac.worker.execution import TaskThread
from celeriac.worker.process import WorkerProcess

STORES = ["sqlite", "file", "memory", "redis"]


def _app(kind: str, tmp: Path, request: pytest.FixtureRequest) -> Celery:
    url = {"sqlite": f"sqlite:///{tmp}/results.db", "file": f"file://{tmp}/results",
           "memory": f"memory://{tmp}"}.get(kind)
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    return Celery("caps", broker=f"memory://{tmp}", backend=url)


@pytest.fixture(params=STORES)
def app(request, tmp_path):
    app = _app(request.param, tmp_path, request)
    yield app
    app.close()


def test_the_revoke_record_keeps_the_newest_revokes_max(app, monkeypatch):
    monkeypatch.setattr(control, "REVOKES_MAX", 100)
    until = time.time() + 3600
    first = [new_id() for _ in range(60)]
    app.backend.add_revoked(first, until)
    later = [new_id() for _ in range(30)]
    for i, task_id in enumerate(later):  # one at a time, as revokes come
        app.backend.add_revoked([task_id], until + i)
    app.backend.add_revoked(first[:5], until + 100)  # revoked again: newest now
    flood = [new_id() for _ in range(80)]
    app.backend.add_revoked(flood, until + 200)
    kept = app.backend.revoked()
    assert len(kept) <= 100
    assert set(flood) <= set(kept)  # the newest are kept, the oldest forgotten
    assert set(first[:5]) <= set(kept)
    assert not set(first[5:]) & set(kept)


def test_a_worker_process_keeps_at_most_revokes_max_revoked_ids(tmp_path):
    app = Celery("caps", broker=f"sqlite:///{tmp_path}/t.db")
    process = WorkerProcess(app, ["celery"], "w@caps", TaskThread())
    try:
        sent = []
        for _ in range(600):  # a flood of revoke broadcasts: 60,000 ids
            ids = [new_id() for _ in range(100)]
            sent += ids
            process.on_command({"method": "revoke", "arguments": {"task_id": ids},
                                "destination": None})
        assert len(process.revoked) <= control.REVOKES_MAX == 50_000
        assert process._is_revoked(sent[-1]) and process._is_revoked(sent[-40_000])
        assert not process._is_revoked(sent[0])
    finally:
        process.io.shutdown()
        app.close()


def _sent(app: Celery, task_id: str, at: float, *later: str) -> None:
    """The producer's PENDING entry written at ``at``, then ``later`` states' entries."""
    records = [Record(task_id, history_entry(states.PENDING, {"task": "t", "queue": "q"},
                                             timestamp=at))]
    records += [Record(task_id, history_entry(state, timestamp=at + 1)) for state in later]
    app.backend.record(records)


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_cleanup_expires_the_histories_of_tasks_never_run(kind, tmp_path, request):
    app = _app(kind, tmp_path, request)
    try:
        b = app.backend
        old, cutoff = time.time() - 7200, time.time() - 3600
        never_run, recent, received, started, done = (new_id() for _ in range(5))
        _sent(app, never_run, old)
        _sent(app, recent, time.time())
        _sent(app, received, old, states.RECEIVED)  # taken by a worker: running, or lost
        _sent(app, started, old)
        b.store(started, states.STARTED, {"pid": 1})
        _sent(app, done, old)
        b.store(done, states.SUCCESS, 1)
        if kind == "file":  # as if last written at those times
            for task_id in (never_run, received, started, done):
                for prefix in ("celeriac-task-history-", "celery-task-meta-"):
                    path = tmp_path / "results" / f"{prefix}{task_id}"
                    if path.exists():
                        os.utime(path, (old + 2, old + 2))
        else:
            b.connections.get().execute("UPDATE celeriac_task_meta SET updated_at = ?",
                                        (old + 2,))
        assert b.cleanup(cutoff) == 2  # the never-run history and the old result
        assert not b.exists(never_run) and not b.exists(done)
        assert [h["state"] for h in b.history(recent)] == [states.PENDING]
        assert [h["state"] for h in b.history(received)] == [states.PENDING, states.RECEIVED]
        assert [h["state"] for h in b.history(started)] == [states.PENDING, states.STARTED]
    finally:
        app.close()


def test_redis_histories_of_tasks_never_run_expire_with_result_expires(project, redis_url):
    import redis

    app = Celery("caps", broker=redis_url, backend=redis_url)
    app.conf.result_expires = 600

    @app.task
    def never_run() -> None: ...

    try:
        r = never_run.delay()
        client = redis.Redis.from_url(redis_url)
        key = f"celeriac-task-history-{r.id}"
        assert client.exists(key) and 0 < client.ttl(key) <= 600
        client.close()
    finally:
        app.close()
