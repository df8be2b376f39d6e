"""The write path: transactions that fail, records a store refuses for good."""

from __future__ import annotations

import importlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import redis

from celeriac import Celery, states
from celeriac._sqlite import write_transaction
from celeriac.bell import bell_dir
from celeriac.exceptions import BackendStoreError
from celeriac.protocol import new_id

from .conftest import Worker, need_server, wait_until, write_module


def test_a_failed_commit_is_rolled_back_and_the_connection_writes_again(tmp_path: Path):
    app = Celery("t", broker=f"memory://{tmp_path}", backend=f"sqlite:///{tmp_path}/r.db")
    try:
        backend = app.backend
        conn = backend.connections.get()
        # a constraint checked only at COMMIT: a deferred foreign key
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE child (parent INTEGER REFERENCES parent (id) "
                     "DEFERRABLE INITIALLY DEFERRED)")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), \
                write_transaction(conn):
            conn.execute("INSERT INTO child (parent) VALUES (42)")
        assert not conn.in_transaction
        tid = new_id()
        assert backend.store(tid, states.SUCCESS, 7)  # the same thread, the same connection
        assert backend.connections.get() is conn
        assert app.AsyncResult(tid).get(timeout=10) == 7
        assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    finally:
        app.close()


def test_a_full_database_raises_its_own_error_and_writes_again_once_there_is_room(
        tmp_path: Path):
    app = Celery("t", broker=f"memory://{tmp_path}", backend=f"sqlite:///{tmp_path}/r.db")
    try:
        backend = app.backend
        conn = backend.connections.get()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the disk is (nearly) full
        tid = new_id()
        with pytest.raises(sqlite3.OperationalError, match="full"):
            backend.store(tid, states.SUCCESS, "x" * 100_000)
        assert not conn.in_transaction
        conn.execute("PRAGMA max_page_count = 1000000")  # room again
        assert backend.store(tid, states.SUCCESS, 7)
        assert app.AsyncResult(tid).get(timeout=10) == 7
    finally:
        app.close()


# ----------------------------------------------------------------------- refused for good

REFUSED = """
import os, sqlite3
from celeriac import Celery, _sqlite

# SQLite refuses a value longer than SQLITE_LIMIT_LENGTH (1 GB by default) with DataError
# ("string or blob too big"); lower the limit so a test-sized result is refused the same way
_connect = _sqlite.connect

def connect(path):
    conn = _connect(path)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)
    return conn

_sqlite.connect = connect

app = Celery('refused', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND'))

@app.task
def big(n):
    return 'x' * n

@app.task
def add(x, y):
    return x + y
"""


@pytest.fixture
def refused(project, monkeypatch):
    def load(broker: str, backend: str | None = None):
        monkeypatch.setenv("TEST_BROKER", broker)
        if backend:
            monkeypatch.setenv("TEST_BACKEND", backend)
        write_module(project, "refused", REFUSED)
        return importlib.import_module("refused")
    return load


def test_a_result_sqlite_refuses_becomes_failure_and_the_process_goes_on(refused, project,
                                                                         workers):
    mod = refused(f"sqlite:///{project}/tasks.db")
    workers.append(w := Worker(project, "refused", concurrency=1))
    too_big = mod.big.delay(200_000)
    after = [mod.add.delay(i, 1) for i in range(5)]
    assert [r.get(timeout=30) for r in after] == [1, 2, 3, 4, 5]
    with pytest.raises(BackendStoreError, match=r"SUCCESS of task .* could not be stored: "
                                                r"DataError: string or blob too big"):
        too_big.get(timeout=30)
    assert [h["state"] for h in too_big.history] == [
        states.PENDING, states.RECEIVED, states.FAILURE]
    assert mod.big.delay(10).get(timeout=30) == "x" * 10  # the same process, still writing
    assert "storing FAILURE in its place" in w.log


def test_a_task_whose_redis_key_has_the_wrong_type_does_not_block_the_others(
        refused, project, workers, redis_url):
    mod = refused(redis_url, redis_url)
    client = redis.Redis.from_url(redis_url)
    blocked = new_id()
    client.rpush(f"celery-task-meta-{blocked}", "not a meta")  # WRONGTYPE for every write
    workers.append(w := Worker(project, "refused", concurrency=1))
    before = [mod.add.delay(i, 1) for i in range(3)]
    mod.add.apply_async((0, 0), task_id=blocked)
    after = [mod.add.delay(i, 10) for i in range(3)]
    assert [r.get(timeout=30) for r in before + after] == [1, 2, 3, 10, 11, 12]
    w.wait_for_log(f"dropped the FAILURE of task {blocked}", timeout=30)
    assert "WRONGTYPE" in w.log
    assert client.type(f"celery-task-meta-{blocked}") == b"list"
    assert [h["state"] for h in mod.app.AsyncResult(blocked).history] == [
        states.PENDING, states.RECEIVED]
    # nothing is left unacked, and a later task is written at once
    assert mod.add.delay(2, 2).get(timeout=30) == 4
    wait_until(lambda: client.hlen("unacked") == 0, what="every message acked")
    client.close()


# ----------------------------------------------------------------------- waiting threads

GATED = """
import os, time
from celeriac import Celery

app = Celery('gated', broker=os.environ['TEST_BROKER'])

@app.task
def gated(i, gate):
    while not os.path.exists(gate):  # held until the test opens the gate
        time.sleep(0.01)
    return i
"""


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_threads_waiting_in_get_share_one_listener_and_one_connection(project, workers,
                                                                    monkeypatch):
    monkeypatch.setenv("TEST_BROKER", f"sqlite:///{project}/tasks.db")
    write_module(project, "gated", GATED)
    mod = importlib.import_module("gated")
    workers.append(Worker(project, "gated", concurrency=2))
    gate = project / "gate"
    gate.touch()
    assert mod.gated.delay(-1, str(gate)).get(timeout=30) == -1  # this process listens now
    gate.unlink()
    sockets = Path(bell_dir(str(project / "tasks.db"), "results"))
    mine = f"{os.getpid()}-"
    assert len([n for n in os.listdir(sockets) if n.startswith(mine)]) == 1
    before = _fds()

    results = [mod.gated.delay(i, str(gate)) for i in range(50)]
    got: dict[int, int] = {}
    waiting = threading.Barrier(51)

    def wait_for(i: int) -> None:
        waiting.wait()
        got[i] = results[i].get(timeout=120)

    threads = [threading.Thread(target=wait_for, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    waiting.wait()
    gate.touch()
    for t in threads:
        t.join()
    assert got == {i: i for i in range(50)}
    assert _fds() - before <= 3
    assert len([n for n in os.listdir(sockets) if n.startswith(mine)]) == 1


@pytest.fixture
def full_redis(tmp_path):
    """A Redis server of this test's own whose ``maxmemory`` policy is ``noeviction``
    (writes past ``maxmemory`` are refused): its URL."""
    import shutil
    import socket
    import subprocess

    if shutil.which("redis-server") is None:
        need_server("redis-server", "not installed")
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                need_server("redis-server", f"did not start on port {port}")
            time.sleep(0.05)
    client.close()
    yield url
    server.terminate()
    server.wait()


def test_a_full_redis_fails_what_it_refuses_and_the_process_goes_on(refused, project, workers,
                                                                   full_redis):
    mod = refused(f"sqlite:///{project}/tasks.db", full_redis)
    client = redis.Redis.from_url(full_redis)
    workers.append(w := Worker(project, "refused", concurrency=1))
    assert mod.add.delay(1, 1).get(timeout=30) == 2
    fillers = [f"filler-{i}" for i in range(60)]
    for key in fillers:
        client.set(key, b"x" * 100_000)
    client.config_set("maxmemory", "4mb")  # it holds 6 MB: every write is refused
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("one-more", b"x")
    refused_task = mod.add.delay(2, 2)
    w.wait_for_log(f"dropped the FAILURE of task {refused_task.id}", timeout=30)
    assert "OutOfMemoryError: command not allowed when used memory" in w.log
    client.delete(*fillers)  # room again
    assert [mod.add.delay(i, 3).get(timeout=30) for i in range(3)] == [3, 4, 5]
    assert refused_task.state == states.PENDING  # nothing of it could be stored
    db = sqlite3.connect(project / "tasks.db")
    wait_until(lambda: not db.execute("SELECT COUNT(*) FROM celeriac_messages").fetchone()[0],
               what="every message acked")
    db.close()
    client.close()
