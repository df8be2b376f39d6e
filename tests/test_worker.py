"""The worker with real processes on the embedded broker: async tasks, bad messages,
shutdown, process replacement, leases, queues."""

from __future__ import annotations

import base64
import importlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from celeriac import states
from celeriac.bell import bell_dir
from celeriac.exceptions import DecodeError, NotRegistered
from celeriac.protocol import new_id

from .conftest import Worker, wait_until, write_module

TASKS = """
import asyncio, os, time
from celeriac import Celery

app = Celery('tasks')
app.conf.update(task_track_started=True,
                broker_transport_options={'visibility_timeout': float(os.environ.get('LEASE', 30))})

@app.task
def add(x, y):
    return x + y

@app.task
def sleepy(seconds, tag=None):
    time.sleep(seconds)
    return tag

@app.task(acks_late=True)
def sleepy_late(seconds, tag=None):
    time.sleep(seconds)
    return tag

overlapping = 0


@app.task
async def overlaps():  # whether another task ran on this loop while this one awaited
    global overlapping
    overlapping += 1
    try:
        for _ in range(200):
            if overlapping > 1:
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await asyncio.sleep(0.05)  # let the others see this one too
        overlapping -= 1


@app.task(bind=True)
async def async_add(self, x, y):
    self.update_state(state='AWAITING', meta={'x': x})
    await asyncio.sleep(0.2)
    r = self.request
    return {'sum': x + y, 'id': r.id, 'args': r.args, 'retries': r.retries,
            'hostname': r.hostname, 'queue': r.delivery_info['routing_key']}


class ShippingError(Exception):
    pass


@app.task
def fails_custom(order):
    raise ShippingError('cannot ship', order)

@app.task
def whoami():
    return os.getpid()

@app.task
def unserializable_result():
    return object()

@app.task(queue='other')
def routed():
    return 'other'

@app.task
def exits():
    raise SystemExit(3)
"""


@pytest.fixture
def tasks(project):
    write_module(project, "tasks", TASKS)
    return importlib.import_module("tasks")


def _db(project):
    return sqlite3.connect(project / "celeriac.db")


def test_async_task_runs_on_the_loop(tasks, project, workers):
    workers.append(Worker(project, "tasks", concurrency=1))
    rs = [tasks.async_add.delay(i, 1) for i in range(8)]
    out = [r.get(timeout=10) for r in rs]
    # coroutines of one process overlap on its loop (prefetch 4)
    assert [r.get(timeout=20) for r in [tasks.overlaps.delay() for _ in range(4)]] == [True] * 4
    assert [o["sum"] for o in out] == [i + 1 for i in range(8)]
    assert out[0]["id"] == rs[0].id and out[0]["args"] == [0, 1] and out[0]["retries"] == 0
    assert out[0]["hostname"] == "celery@" + os.uname().nodename
    assert out[0]["queue"] == "celery"
    assert "AWAITING" in [h["state"] for h in rs[0].history]
    assert rs[0].history[-1]["state"] == states.SUCCESS


def test_unknown_task_fails_and_worker_goes_on(tasks, project, workers):
    w = Worker(project, "tasks")
    workers.append(w)
    r = tasks.app.send_task("tasks.does_not_exist", (1,))
    with pytest.raises(NotRegistered, match="tasks.does_not_exist"):
        r.get(timeout=10)
    assert r.state == states.FAILURE
    assert tasks.add.delay(1, 2).get(timeout=10) == 3
    assert "Received unregistered task of type 'tasks.does_not_exist'" in w.log
    # set aside once FAILURE is stored (the caller may see FAILURE first)
    dead = wait_until(lambda: _db(project).execute(
        "SELECT reason FROM celeriac_dead_letters").fetchall(), what="the dead letter")
    assert dead == [("unregistered task 'tasks.does_not_exist'",)]


def test_malformed_messages_are_set_aside(tasks, project, workers):
    tasks.add.delay(0, 0).forget()  # creates the database
    good_id = new_id()
    envelope = {
        "body": base64.b64encode(b"[[1], {}, not json").decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "tasks.add", "id": good_id},
        "properties": {"body_encoding": "base64", "correlation_id": good_id},
    }
    with _db(project) as db:
        db.execute("INSERT INTO celeriac_messages (queue, priority, visible_at, payload) "
                   "VALUES ('celery', 0, 0, ?)", (b"\x00 definitely not an envelope",))
        db.execute("INSERT INTO celeriac_messages (queue, priority, visible_at, payload) "
                   "VALUES ('celery', 0, 0, ?)", (json.dumps(envelope).encode(),))
    w = Worker(project, "tasks")
    workers.append(w)
    r = tasks.app.AsyncResult(good_id)
    with pytest.raises(DecodeError, match="cannot decode application/json"):
        r.get(timeout=10)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4  # still working

    def dead_letters() -> list[str]:
        return [x for (x,) in _db(project).execute(
            "SELECT reason FROM celeriac_dead_letters ORDER BY id")]

    reasons = wait_until(lambda: len(found := dead_letters()) == 2 and found,
                         what="two dead letters")
    assert all(reason.startswith("malformed message") for reason in reasons)
    left = _db(project).execute("SELECT count(*) FROM celeriac_messages").fetchone()[0]
    assert left == 0


def test_an_importable_exception_comes_back_as_its_own_class(tasks, project, workers):
    workers.append(Worker(project, "tasks"))
    r = tasks.fails_custom.delay(42)
    with pytest.raises(tasks.ShippingError) as info:
        r.get(timeout=10)
    assert info.value.args == ("cannot ship", 42)
    meta = r.backend.get_meta(r.id)
    assert meta["result"] == {"exc_type": "ShippingError", "exc_message": ["cannot ship", 42],
                              "exc_module": "tasks"}


def test_unserializable_result_becomes_a_clear_failure(tasks, project, workers):
    workers.append(Worker(project, "tasks"))
    r = tasks.unserializable_result.delay()
    with pytest.raises(Exception, match="result of task tasks.unserializable_result cannot"):
        r.get(timeout=10)


def test_sigterm_finishes_running_tasks_and_loses_nothing(tasks, project, workers):
    w = Worker(project, "tasks", concurrency=1)
    workers.append(w)
    running = tasks.sleepy.delay(1.5, "running")
    waiting = [tasks.sleepy.delay(0.01, f"w{i}") for i in range(6)]
    deadline = time.monotonic() + 10
    while running.state != states.STARTED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.state == states.STARTED
    assert w.stop(signal.SIGTERM) == 0
    assert running.state == states.SUCCESS and running.result == "running"
    # whatever the stopped worker had prefetched went back; a new worker runs it all
    workers.append(Worker(project, "tasks"))
    assert [r.get(timeout=10) for r in waiting] == [f"w{i}" for i in range(6)]


def test_a_dead_worker_process_is_replaced(tasks, project, workers):
    w = Worker(project, "tasks", concurrency=2)
    workers.append(w)
    pids = w.child_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    w.wait_for_log("exited with signal 9 (SIGKILL); starting a new one")
    deadline = time.monotonic() + 10
    while (len(w.child_pids()) != 2 or pids[0] in w.child_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    new = w.child_pids()
    assert len(new) == 2 and pids[0] not in new
    seen = {tasks.whoami.delay().get(timeout=10) for _ in range(20)}
    assert seen <= set(new)


def test_message_of_a_killed_worker_is_delivered_again_after_its_lease(tasks, project, workers,
                                                                      monkeypatch):
    env = {"LEASE": "1.5"}
    w = Worker(project, "tasks", concurrency=1, env=env)
    r = tasks.sleepy_late.delay(1.0, "survived")
    deadline = time.monotonic() + 10
    while r.state != states.STARTED and time.monotonic() < deadline:
        time.sleep(0.01)
    w.kill_all()  # the whole machine "dies" mid-task: no ack, no shutdown
    assert r.state == states.STARTED
    workers.append(Worker(project, "tasks", concurrency=1, env=env))
    assert r.get(timeout=15) == "survived"
    hist = [h["state"] for h in r.history]
    assert hist.count(states.RECEIVED) == 2 and hist[-1] == states.SUCCESS


def test_queues_are_separate_and_fifo(tasks, project, workers):
    other = [tasks.routed.delay() for _ in range(3)]
    ordered = [tasks.sleepy.delay(0, i) for i in range(30)]
    workers.append(Worker(project, "tasks", "-Q", "celery", concurrency=1))
    assert [r.get(timeout=10) for r in ordered] == list(range(30))
    done_at = [r.history[-1]["timestamp"] for r in ordered]
    assert done_at == sorted(done_at)  # one process, one queue: first in, first done
    assert all(r.state == states.PENDING for r in other)
    workers.append(Worker(project, "tasks", "-Q", "other", concurrency=1))
    assert [r.get(timeout=10) for r in other] == ["other"] * 3


def _produce(n: int, offset: int) -> list[str]:
    tasks = importlib.import_module("tasks")
    return [tasks.add.delay(offset, i).id for i in range(n)]


def test_several_producers_and_workers_at_once(tasks, project, workers):
    import multiprocessing

    workers.append(Worker(project, "tasks", concurrency=2))
    workers.append(Worker(project, "tasks", "-n", "second@%h", concurrency=1))
    with multiprocessing.get_context("fork").Pool(3) as pool:
        batches = pool.starmap(_produce, [(100, 1000 * k) for k in range(3)])
    for k, ids in enumerate(batches):
        assert [tasks.app.AsyncResult(i).get(timeout=30) for i in ids] == [
            1000 * k + i for i in range(100)]
    hosts = {tasks.app.AsyncResult(i).history[-1]["hostname"] for ids in batches for i in ids}
    assert hosts <= {"celery@" + os.uname().nodename, "second@" + os.uname().nodename}


def test_long_tasks_spread_over_processes(tasks, project, workers):
    """A process busy with a long task hands its prefetched messages back to idle ones."""
    from collections import Counter

    rs = [tasks.sleepy.delay(1.0, i) for i in range(4)]
    workers.append(Worker(project, "tasks", concurrency=2))
    assert [r.get(timeout=20) for r in rs] == [0, 1, 2, 3]
    # the busy process handed back what it held, and another one ran it
    assert len(Counter(r.history[-1]["pid"] for r in rs)) == 2
    for r in rs:
        assert [h["state"] for h in r.history].count(states.STARTED) == 1


def test_worker_removes_expired_results(project, workers):
    write_module(project, "exptasks", """
        from celeriac import Celery
        app = Celery('exptasks', result_expires=1.5)

        @app.task
        def one():
            return 1
    """)
    mod = importlib.import_module("exptasks")
    workers.append(Worker(project, "exptasks"))
    r = mod.one.delay()
    assert r.get(timeout=10) == 1
    deadline = time.monotonic() + 10
    while r.backend.exists(r.id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not r.backend.exists(r.id)
    assert r.backend.get_meta(r.id)["status"] == states.PENDING


def test_result_extended_fields_in_celerys_order(project, workers):
    write_module(project, "exttasks", """
        import os
        from celeriac import Celery
        app = Celery('exttasks', result_extended=True,
                     result_backend='file://' + os.path.join(os.getcwd(), 'res'))

        @app.task
        def mul(x, y):
            return x * y
    """)
    mod = importlib.import_module("exttasks")
    workers.append(Worker(project, "exttasks", "-n", "w1@%h"))
    r = mod.mul.delay(6, 7)
    assert r.get(timeout=10) == 42
    meta = json.loads((project / "res" / f"celery-task-meta-{r.id}").read_bytes())
    assert list(meta) == ["status", "result", "traceback", "children", "date_done",
                          "name", "args", "kwargs", "worker", "retries", "queue", "task_id"]
    assert (meta["name"], meta["args"], meta["kwargs"], meta["retries"], meta["queue"]) == (
        "exttasks.mul", [6, 7], {}, 0, "celery")
    assert meta["worker"] == "w1@" + os.uname().nodename
    assert (r.name, r.args, r.queue) == ("exttasks.mul", [6, 7], "celery")


def test_a_task_raising_systemexit_fails_and_the_worker_goes_on(tasks, project, workers):
    workers.append(Worker(project, "tasks", concurrency=1))
    r = tasks.exits.delay()
    with pytest.raises(Exception, match="3") as info:  # an ordinary error in the caller
        r.get(timeout=10)
    assert type(info.value).__name__ == "SystemExit"
    assert r.state == states.FAILURE
    assert tasks.add.delay(1, 1).get(timeout=10) == 2


def test_a_message_with_a_bad_header_is_set_aside(tasks, project, workers):
    tasks.add.delay(0, 0).forget()  # creates the database
    bad_id = new_id()
    envelope = {
        "body": base64.b64encode(b"[[1, 2], {}, {}]").decode(),
        "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": "tasks.add", "id": bad_id, "retries": "abc"},
        "properties": {"body_encoding": "base64", "correlation_id": bad_id},
    }
    with _db(project) as db:
        db.execute("INSERT INTO celeriac_messages (queue, priority, visible_at, payload) "
                   "VALUES ('celery', 0, 0, ?)", (json.dumps(envelope).encode(),))
    workers.append(Worker(project, "tasks", concurrency=1))
    with pytest.raises(DecodeError, match="header 'retries' must be an integer"):
        tasks.app.AsyncResult(bad_id).get(timeout=10)
    assert tasks.add.delay(2, 2).get(timeout=10) == 4
    wait_until(lambda: _db(project).execute(
        "SELECT count(*) FROM celeriac_messages").fetchone()[0] == 0, what="no message left")


def test_priorities_run_highest_first(tasks, project, workers):
    order = [0, 9, 5, 9, 0, 3]
    rs = [tasks.sleepy.apply_async((0, i), priority=p) for i, p in enumerate(order)]
    workers.append(Worker(project, "tasks", concurrency=1))
    for r in rs:
        r.get(timeout=10)
    ran = sorted(rs, key=lambda r: r.history[-1]["timestamp"])
    assert [order[r.result] for r in ran] == [9, 9, 5, 3, 0, 0]
    assert [r.result for r in ran][:2] == [1, 3]  # FIFO within a priority


def test_countdown_is_not_run_early(tasks, project, workers):
    workers.append(Worker(project, "tasks", concurrency=1))
    tasks.add.delay(0, 0).get(timeout=10)  # the worker is up and idle
    for countdown in (0.3, 0.6):
        sent = time.time()
        r = tasks.add.apply_async((1, 1), countdown=countdown)
        assert r.get(timeout=10) == 2
        started = [h for h in r.history if h["state"] == states.RECEIVED][0]["timestamp"]
        assert started.timestamp() >= sent + countdown


def test_a_removed_bell_socket_is_bound_again(tasks, project, workers):
    workers.append(Worker(project, "tasks", concurrency=1))
    assert tasks.add.delay(1, 1).get(timeout=10) == 2
    # beside the store, or under the temp directory when that path is too long for a socket
    bell = Path(bell_dir(str(project / "celeriac.db"), "queues"))
    for sock in bell.iterdir():
        sock.unlink()
    assert tasks.add.delay(1, 2).get(timeout=10) == 3  # found by the idle re-check
    # the worker listens again
    wait_until(lambda: [p.suffix for p in bell.iterdir()] == [".idle"], what="a new socket")
    assert tasks.add.delay(1, 3).get(timeout=10) == 4


def test_worker_processes_stop_when_the_main_process_is_killed(tasks, project, workers):
    w = Worker(project, "tasks", concurrency=2)
    children = w.child_pids()
    w.proc.send_signal(signal.SIGKILL)  # the supervisor only
    w.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.1)
    assert not any(_alive(p) for p in children)
    w._log.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[1].split()[0] != "Z"


@pytest.mark.parametrize(("settings", "says"), [
    ("broker_connection_retry_on_startup=False", "broker_connection_retry_on_startup is False"),
    ("broker_connection_max_retries=1", "gave up after 1 retries"),
])
def test_a_worker_whose_broker_is_down_at_start_says_so_and_exits(project, settings, says):
    """As Celery: without start-up retries the first failure stops the worker; with
    them it tries again, at most broker_connection_max_retries times."""
    import subprocess

    from .conftest import CELERIAC

    write_module(project, "downtasks", f"""
        from celeriac import Celery
        app = Celery('downtasks', broker='redis://:secret@127.0.0.1:1/0')
        app.conf.update({settings})
        """)
    proc = subprocess.run([*CELERIAC, "-A", "downtasks", "worker", "-c", "1"], cwd=project,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "cannot connect to the broker redis://:**@127.0.0.1:1/0" in proc.stderr
    assert says in proc.stderr
    assert "secret" not in proc.stderr
    assert "celeriac worker" not in proc.stderr  # no process was started
