"""SQLite plumbing shared by the embedded broker and the SQLite result backend."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

from .exceptions import ImproperlyConfigured


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` is relative to the current directory, ``sqlite:////abs.db`` absolute
    (SQLAlchemy's convention, which Celery users know from ``db+sqlite://``)."""
    for prefix in ("sqlite://", "db+sqlite://"):
        if url.startswith(prefix):
            rest = url[len(prefix):]
            break
    else:
        raise ImproperlyConfigured(f"not a sqlite URL: {url!r}")
    if not rest.startswith("/") or rest == "/":
        raise ImproperlyConfigured(
            f"sqlite URL {url!r} names no file: use sqlite:///relative.db or sqlite:////abs.db"
        )
    path = rest[1:]
    return os.path.abspath(path)


def connect(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    # Switching a new file to WAL needs an exclusive lock and does not wait on the busy
    # timeout, so processes opening a fresh file together retry here.
    deadline = time.monotonic() + 30.0
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


class ThreadConnections:
    """One connection per thread and per process (connections must not cross a fork)."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self._schema = schema
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = connect(self.path)
            conn.executescript(self._schema)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None
