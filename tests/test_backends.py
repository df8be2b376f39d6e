"""Result backends: the transition rule, history, forget/exists, unsafe ids, Celery's format."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from celeriac import Celery, states
from celeriac.exceptions import UnsafeTaskId
from celeriac.protocol import new_id

BACKENDS = ["sqlite", "file", "memory"]


def make_app(kind: str, tmp: Path) -> Celery:
    url = {
        "sqlite": f"sqlite:///{tmp}/results.db",
        "file": f"file://{tmp}/results",
        "memory": f"memory://{tmp}",
    }[kind]
    return Celery("t", broker=f"memory://{tmp}", backend=url)


@pytest.fixture(params=BACKENDS)
def app(request, tmp_path):
    app = make_app(request.param, tmp_path)
    yield app
    app.close()


def test_unknown_id_is_pending_and_does_not_exist(app):
    r = app.AsyncResult(new_id())
    assert r.state == states.PENDING and r.result is None
    assert not r.exists() and r.history == []


@pytest.mark.parametrize("final", [states.SUCCESS, states.FAILURE, states.REVOKED])
def test_ready_state_is_final(app, final):
    tid = new_id()
    b = app.backend
    assert b.store(tid, states.STARTED, {"pid": 1})
    value = 7 if final == states.SUCCESS else ValueError("boom", 3)
    assert b.store(tid, final, value)
    for later in (states.STARTED, states.RETRY, "PROGRESS", states.PENDING, states.SUCCESS):
        assert not b.store(tid, later, {"late": True})
    r = app.AsyncResult(tid)
    assert r.state == final
    assert [h["state"] for h in r.history] == [states.STARTED, final]


def test_custom_states_replace_each_other_and_keep_history(app):
    tid = new_id()
    b = app.backend
    b.append_history(tid, states.PENDING, {"task": "x"})
    for i in range(3):
        assert b.store(tid, "PROGRESS", {"step": i}, entry_meta={"step": i})
    r = app.AsyncResult(tid)
    assert r.state == "PROGRESS" and r.info == {"step": 2}
    assert not r.ready() and not r.successful() and not r.failed()
    hist = r.history
    assert [h["state"] for h in hist] == [states.PENDING, "PROGRESS", "PROGRESS", "PROGRESS"]
    assert [h["meta"] for h in hist[1:]] == [{"step": 0}, {"step": 1}, {"step": 2}]
    times = [h["timestamp"] for h in hist]
    assert times == sorted(times)


def test_forget_is_idempotent(app):
    tid = new_id()
    app.backend.store(tid, states.SUCCESS, 1)
    r = app.AsyncResult(tid)
    assert r.exists()
    r.forget()
    r.forget()
    app.AsyncResult(new_id()).forget()
    assert not app.AsyncResult(tid).exists()
    assert app.AsyncResult(tid).state == states.PENDING


@pytest.mark.parametrize("bad", ["../../etc/passwd", "a/b", "..", "", "x\n", "/abs", "a\x00b"])
def test_unsafe_ids_are_refused(app, bad, tmp_path):
    with pytest.raises(UnsafeTaskId):
        app.backend.store(bad, states.SUCCESS, 1)
    with pytest.raises(UnsafeTaskId):
        app.backend.prepare_record(bad, "PROGRESS", {"x": 1})
    with pytest.raises(UnsafeTaskId):
        app.backend.append_history(bad, states.PENDING)
    with pytest.raises(UnsafeTaskId):
        app.backend.forget(bad)
    with pytest.raises(UnsafeTaskId):
        app.AsyncResult(bad)
    assert not (tmp_path / "etc").exists()


def test_get_timeout_raises_celery_style_timeout(app):
    from celeriac.exceptions import TimeoutError as CeleriacTimeout

    with pytest.raises(CeleriacTimeout, match="The operation timed out"):
        app.AsyncResult(new_id()).get(timeout=0.05)
    with pytest.raises(TimeoutError):  # also the builtin
        app.AsyncResult(new_id()).get(timeout=0.05)


def _race(url: str, tid: str, state: str, barrier) -> None:
    app = Celery("t", broker="memory://", backend=url)
    barrier.wait()
    for _ in range(50):
        app.backend.store(tid, state, {"by": state} if state != states.SUCCESS else 1)


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_transition_rule_is_atomic_across_processes(kind, tmp_path):
    """Processes storing STARTED / a custom state race one storing SUCCESS: SUCCESS wins."""
    app = make_app(kind, tmp_path)
    url = app.result_backend_url
    for _ in range(5):
        tid = new_id()
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_race, args=(url, tid, s, barrier))
                 for s in (states.STARTED, "PROGRESS", states.SUCCESS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert app.AsyncResult(tid).state == states.SUCCESS
        hist = [h["state"] for h in app.AsyncResult(tid).history]
        assert hist.count(states.SUCCESS) == 1 and hist[-1] == states.SUCCESS


# --------------------------------------------------------------------------- file backend


def test_file_backend_layout_and_celery_interop(tmp_path):
    import celery

    results = tmp_path / "deep" / "results"
    app = make_app("file", tmp_path)
    app.conf.result_backend = f"file://{results}"
    app.close()
    tid = new_id()
    app.backend.append_history(tid, states.PENDING)
    app.backend.store(tid, states.SUCCESS, {"n": 1, "l": [1, 2]})
    meta_file = results / f"celery-task-meta-{tid}"
    data = meta_file.read_bytes()

    # Bytes are what Celery's own backend would write for the same result.
    capp = celery.Celery("c", backend=f"file://{results}")
    from celery.app.task import Context

    cmeta = capp.backend._get_result_meta({"n": 1, "l": [1, 2]}, "SUCCESS", None,
                                          Context(id=tid, children=[]))
    cmeta["task_id"] = tid
    ours = json.loads(data)
    cmeta["date_done"] = ours["date_done"]
    assert data == capp.backend.encode(cmeta).encode()

    # The history sits beside the meta without touching it.
    history_file = results / f"celeriac-task-history-{tid}"
    assert [json.loads(x)["state"] for x in history_file.read_text().splitlines()] == [
        states.PENDING, states.SUCCESS]
    assert sorted(os.listdir(results)) == sorted([meta_file.name, history_file.name])

    # Celery writes a failure; celeriac reads it as the original exception.
    tid2 = new_id()
    capp.backend.mark_as_failure(tid2, KeyError("missing"), traceback="tb text")
    r = app.AsyncResult(tid2)
    assert r.state == states.FAILURE and r.traceback == "tb text"
    assert isinstance(r.result, KeyError) and r.result.args == ("missing",)
    with pytest.raises(KeyError):
        r.get()


def test_file_backend_refuses_a_directory_it_cannot_create(tmp_path):
    from celeriac.exceptions import ImproperlyConfigured

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    app = Celery("t", broker="memory://", backend=f"file://{blocker}/results")
    with pytest.raises(ImproperlyConfigured, match="cannot use directory"):
        app.backend  # noqa: B018


def _writer(url: str, tid: str, n: int) -> None:
    app = Celery("t", broker="memory://", backend=url)
    blob = "x" * 200_000
    for i in range(n):
        app.backend.store(tid, "PROGRESS", {"step": i, "blob": blob})
    app.backend.store(tid, states.SUCCESS, n)


def test_file_backend_readers_never_see_torn_or_empty_files(tmp_path):
    """While a task stores 200 KB progress metas, a reader never goes back to PENDING
    and never fails to decode (Celery's backend does both)."""
    app = make_app("file", tmp_path)
    tid = new_id()
    proc = multiprocessing.get_context("fork").Process(
        target=_writer, args=(app.result_backend_url, tid, 150))
    proc.start()
    seen_progress = went_back = reads = 0
    while True:
        meta = app.backend.get_meta(tid)  # raises if a torn file were read
        state = meta["status"]
        reads += 1
        if state == "PROGRESS":
            seen_progress += 1
            assert meta["result"]["blob"] == "x" * 200_000
        elif state == states.PENDING and seen_progress:
            went_back += 1
        elif state == states.SUCCESS:
            break
    proc.join(30)
    assert went_back == 0
    assert seen_progress > 0 and reads > seen_progress


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_cleanup_removes_only_old_ready_results(kind, tmp_path):
    import time

    app = make_app(kind, tmp_path)
    app.conf.timezone = "Asia/Tokyo"  # the cutoff is epoch seconds: the zone must not matter
    old, running, fresh = new_id(), new_id(), new_id()
    app.backend.store(old, states.SUCCESS, 1)
    app.backend.store(running, states.STARTED, {"pid": 1})
    cutoff = time.time() + 0.01
    time.sleep(0.02)
    app.backend.store(fresh, states.SUCCESS, 2)
    if kind == "file":  # the file backend goes by modification time
        for tid in (old, running):
            os.utime(tmp_path / "results" / f"celery-task-meta-{tid}", (cutoff - 5, cutoff - 5))
    assert app.backend.cleanup(cutoff) == 1
    assert not app.AsyncResult(old).exists() and app.AsyncResult(old).history == []
    assert app.AsyncResult(running).state == states.STARTED
    assert app.AsyncResult(fresh).get() == 2
    assert app.backend.cleanup(time.time() - 3600) == 0  # nothing an hour old
