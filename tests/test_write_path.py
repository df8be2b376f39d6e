"""The write path: transactions that fail, records a store refuses for good."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from celeriac import Celery, states
from celeriac._sqlite import write_transaction
from celeriac.protocol import new_id


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
