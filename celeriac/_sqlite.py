"""SQLite plumbing shared by the embedded broker and the SQLite result backend.

Lock waits: SQLite's own busy handler sleeps 1, 2, 5, 10... ms between attempts, which
under several writers (producer and worker processes) costs more than the writes
themselves.  Connections here have no busy timeout; :func:`write_transaction` and
:func:`retry_busy` retry themselves, starting at 50 microseconds.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

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


#: Give up on a lock after this long (seconds).
LOCK_TIMEOUT = 30.0
T = TypeVar("T")


def is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def lock_pauses() -> Iterator[float]:
    """Pauses between attempts at a locked database: 50 us doubling to 2 ms, for
    LOCK_TIMEOUT seconds in all."""
    delay = 0.00005
    deadline = time.monotonic() + LOCK_TIMEOUT
    while time.monotonic() < deadline:
        yield delay
        delay = min(delay * 2, 0.002)


def retry_busy(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)``, retrying while the database is locked."""
    for pause in lock_pauses():
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        time.sleep(pause)
    return fn(*args)  # the last try: raises if it is still locked


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, *,
                      wait: bool = True) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back when anything in it (the COMMIT
    too) fails.  Waits for the write lock (short, growing pauses) unless ``wait`` is
    False: then a held lock raises at once, for callers that wait without blocking (the
    worker's event loop)."""
    if wait:
        retry_busy(conn.execute, "BEGIN IMMEDIATE")
    else:
        conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        retry_busy(conn.execute, "COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """End the connection's transaction, if one is open.  A COMMIT that fails (a deferred
    constraint, a full disk) leaves it open, and every later ``BEGIN`` on the connection
    would fail; some errors (SQLITE_FULL, SQLITE_IOERR...) have rolled it back already."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def connect(path: str) -> sqlite3.Connection:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    conn = sqlite3.connect(path, timeout=0.0, isolation_level=None, check_same_thread=False)
    def use_wal() -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")

    retry_busy(use_wal)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


#: Held while a forked child replaces a reader it inherited (made anew in each child).
_FORK_RESET = threading.Lock()


def _new_fork_reset() -> None:
    global _FORK_RESET
    _FORK_RESET = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_reset)


class ThreadConnections:
    """Connections to one file: one per thread that writes (a transaction holds its
    connection from BEGIN to COMMIT), and one per process, behind a lock, that every
    thread reads with, so threads that only read (many threads waiting in ``get()``)
    open nothing of their own.  Connections must not cross a fork: a child opens its own."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self._schema = schema
        self._local = threading.local()
        self._reader: sqlite3.Connection | None = None
        self._reader_pid = os.getpid()
        self._reader_lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._open()
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = connect(self.path)
        retry_busy(conn.executescript, self._schema)
        return conn

    def read(self, sql: str, params: tuple[Any, ...],
             fetch: Callable[[sqlite3.Cursor], T]) -> T:
        """Run a read-only statement on the process's reading connection."""
        pid = os.getpid()
        if self._reader_pid != pid:  # a forked child: the parent's reader and lock
            with _FORK_RESET:  # one thread replaces them, once
                if self._reader_pid != pid:
                    self._reader_lock = threading.Lock()
                    self._reader, self._reader_pid = None, pid
        with self._reader_lock:
            if self._reader is None:
                self._reader = self._open()
            return fetch(self._reader.execute(sql, params))

    def close(self) -> None:
        """Close this thread's connection, and the reading one."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None
        if self._reader_pid == os.getpid():
            with self._reader_lock:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
