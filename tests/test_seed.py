"""The seed scenario, end to end: the three example programs with real worker processes."""

from __future__ import annotations

import importlib
import json
import shutil
import time
from pathlib import Path

import pytest

from celeriac import states

from .conftest import ROOT, Worker

EXAMPLES = ROOT / "examples"
SLEEP = "1.0"


def _example(project: Path, name: str, monkeypatch: pytest.MonkeyPatch):
    shutil.copy(EXAMPLES / name / "task.py", project / "task.py")
    monkeypatch.setenv("EXAMPLE_SLEEP", SLEEP)
    return importlib.import_module("task")


def _wait_state(result, wanted: str, timeout: float = 10.0) -> list[str]:
    """Poll ``result.status`` until ``wanted``; returns every distinct state seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = result.status
        if not seen or seen[-1] != s:
            seen.append(s)
        if s == wanted:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"state {wanted} not reached; seen {seen}")


def test_states_example(project, monkeypatch, workers):
    task = _example(project, "states", monkeypatch)
    r = task.add.delay(2, 3)
    assert repr(r) == f"<AsyncResult: {r.id}>"
    time.sleep(0.3)
    assert r.status == "PENDING"  # no worker yet
    assert r.exists()
    assert not task.app.AsyncResult("no-such-task").exists()

    workers.append(Worker(project, "task"))
    seen = _wait_state(r, "SUCCESS")
    assert "STARTED" in seen and seen[-1] == "SUCCESS"
    assert r.get(timeout=10) == 5
    assert r.successful() and r.ready() and not r.failed()
    assert r.date_done is not None

    r = task.add.delay(2, "a")
    seen = _wait_state(r, "FAILURE")
    assert "STARTED" in seen
    assert r.state == "FAILURE" and r.failed()
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for \+: 'int' and 'str'"):
        r.get(timeout=5)
    assert isinstance(r.result, TypeError)
    assert "TypeError: unsupported operand" in r.traceback
    assert "return x + y" in r.traceback

    history = [h["state"] for h in r.history]
    assert history == ["PENDING", "RECEIVED", "STARTED", "FAILURE"]
    for h in r.history:
        assert h["timestamp"].tzinfo is not None and h["pid"] > 0 and h["hostname"]


def test_custom_state_example(project, monkeypatch, workers):
    task = _example(project, "custom_states", monkeypatch)
    workers.append(Worker(project, "task"))
    r = task.add.delay(2, 3)
    seen = _wait_state(r, "SUCCESS")
    assert "GOING_TO_SLEEP" in seen
    assert seen.index("GOING_TO_SLEEP") < seen.index("SUCCESS")
    assert r.get(timeout=5) == 5
    assert [h["state"] for h in r.history] == [
        "PENDING", "RECEIVED", "STARTED", "GOING_TO_SLEEP", "SUCCESS"]


def test_file_results_example(project, monkeypatch, workers):
    results = project / "results"  # does not exist yet: the backend creates it
    monkeypatch.setenv("EXAMPLE_RESULTS", f"file://{results}")
    task = _example(project, "file_results", monkeypatch)
    workers.append(Worker(project, "task", env={"EXAMPLE_RESULTS": f"file://{results}"}))
    rs = [task.add.delay(1, 1) for _ in range(4)]
    assert [r.get(timeout=15) for r in rs] == [2, 2, 2, 2]

    for r in rs:
        path = results / f"celery-task-meta-{r.id}"
        meta = json.loads(path.read_bytes())
        assert list(meta) == ["status", "result", "traceback", "children", "date_done", "task_id"]
        assert meta["status"] == states.SUCCESS and meta["result"] == 2
        assert meta["traceback"] is None and meta["children"] == [] and meta["task_id"] == r.id
        assert meta["date_done"].endswith("+00:00")

    # Celery 5.7 itself reads what celeriac wrote.
    import celery

    capp = celery.Celery("reader", backend=f"file://{results}")
    for r in rs:
        cr = capp.AsyncResult(r.id)
        assert cr.status == "SUCCESS" and cr.result == 2
