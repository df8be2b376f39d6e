"""``sqlite:///path``: results and histories in one SQLite file (by default the broker's).

Layout (inspect with ``sqlite3``)::

    celeriac_task_meta(task_id PRIMARY KEY, status, meta, updated_at)
    celeriac_task_history(seq, task_id, state, timestamp, hostname, pid, meta)
    celeriac_revoked(task_id PRIMARY KEY, until)   revoked ids, until when (epoch s)
    celeriac_workers(node PRIMARY KEY, heartbeat)  worker nodes, last heartbeat (epoch s)
    celeriac_worker_tasks(node, task_id)           early-acked tasks each node is running

``meta`` holds the Celery result bytes (``result_serializer``), the same bytes
Celery's key-value backends store under ``celery-task-meta-<id>``; history
``meta`` is JSON.  The transition rule is one statement: an upsert whose update
branch carries ``WHERE status NOT IN (<ready states>)``, so check and write are
atomic.  Writers ring a bell after a commit that set a state; ``get()`` sleeps on
it instead of polling.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from sqlite3 import Connection
from typing import TYPE_CHECKING, Any

from .. import control, serialization, states
from .._sqlite import ThreadConnections, path_from_url, retry_busy, write_transaction
from ..bell import Bell, bell_dir, shared_listener
from ..protocol import check_task_id
from .base import Backend, Record, Roster

if TYPE_CHECKING:
    from ..app import Celeriac

SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_task_meta (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    meta BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_task_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    state TEXT NOT NULL,
    timestamp REAL NOT NULL,
    hostname TEXT,
    pid INTEGER,
    meta TEXT
);
CREATE INDEX IF NOT EXISTS celeriac_task_history_by_task
    ON celeriac_task_history (task_id, seq);
CREATE TABLE IF NOT EXISTS celeriac_revoked (
    task_id TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_workers (
    node TEXT PRIMARY KEY,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_worker_tasks (
    node TEXT NOT NULL,
    task_id TEXT NOT NULL,
    PRIMARY KEY (node, task_id)
) WITHOUT ROWID;
"""
#: Ids per statement when revoking many tasks at once (SQLite's variable limit).
CHUNK = 500

_READY_SQL = ", ".join(f"'{s}'" for s in sorted(states.READY_STATES))
_UPSERT = (
    "INSERT INTO celeriac_task_meta (task_id, status, meta, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, meta = excluded.meta, "
    "updated_at = excluded.updated_at "
    f"WHERE celeriac_task_meta.status NOT IN ({_READY_SQL})"
)
_APPEND = (
    "INSERT INTO celeriac_task_history (task_id, state, timestamp, hostname, pid, meta) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
#: Longest a waiter sleeps between checks when no ring comes (a writer without bells).
WAIT_RECHECK = 0.25


class SQLiteBackend(Backend):
    keeps_heartbeats = True

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        self.path = path_from_url(url)
        self.connections = ThreadConnections(self.path, SCHEMA)
        self._bell_dir = bell_dir(self.path, "results")
        self._bell: Bell | None = None
        self._local = threading.local()

    def _get(self, task_id: str) -> bytes | None:
        row = retry_busy(self._one, "SELECT meta FROM celeriac_task_meta WHERE task_id = ?",
                         (task_id,))
        return None if row is None else bytes(row[0])

    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        conn = self.connections.get()
        with write_transaction(conn):
            applied = self.apply(conn, records, roster)
        self.after_commit(records)
        return applied

    def apply(self, conn: Connection, records: Sequence[Record],
              roster: Roster | None = None) -> list[bool]:
        """The statements of :meth:`record`, inside a transaction the caller holds (the
        embedded broker uses this to write results and acks in one transaction).  Call
        :meth:`ensure_tables` before that transaction begins."""
        if roster is not None:
            conn.executemany("INSERT OR IGNORE INTO celeriac_worker_tasks (node, task_id) "
                             "VALUES (?, ?)", [(roster.node, t) for t in roster.started])
            conn.executemany("DELETE FROM celeriac_worker_tasks WHERE node = ? AND task_id = ?",
                             [(roster.node, t) for t in roster.ended])
        applied: list[bool] = []
        for r in records:
            if r.state is not None:
                cur = conn.execute(_UPSERT, (r.task_id, r.state, r.payload, time.time()))
                if cur.rowcount == 0:
                    applied.append(False)
                    continue
            e = r.entry
            meta = None if e["meta"] is None else serialization.json_dumps_lenient(e["meta"])
            conn.execute(_APPEND, (r.task_id, e["state"], e["timestamp"], e["hostname"],
                                   e["pid"], meta))
            applied.append(True)
        return applied

    def permanent(self, exc: BaseException) -> bool:
        """SQLite refuses a record for good with DataError (a value over the length limit,
        SQLITE_TOOBIG), IntegrityError (a constraint), ProgrammingError and
        InterfaceError (a value it cannot bind).  OperationalError (locked, busy, a full
        disk, I/O) and the rest may pass: they are waited for."""
        return super().permanent(exc) or isinstance(exc, (
            sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError,
            sqlite3.InterfaceError, sqlite3.NotSupportedError))

    def ensure_tables(self) -> None:
        self.connections.get()  # a thread's first connection creates the tables

    def after_commit(self, records: Sequence[Record]) -> None:
        """Wake waiters once states are committed."""
        if any(r.state is not None for r in records):
            if self._bell is None:
                self._bell = Bell(self._bell_dir)
            self._bell.ring()

    def history(self, task_id: str) -> list[dict[str, Any]]:
        rows = retry_busy(self._all, "SELECT state, timestamp, hostname, pid, meta "
                          "FROM celeriac_task_history WHERE task_id = ? ORDER BY seq", (task_id,))
        return [
            {"state": s, "timestamp": ts, "hostname": h, "pid": p,
             "meta": None if m is None else json.loads(m)}
            for s, ts, h, p, m in rows
        ]

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:
        conn = self.connections.get()
        with write_transaction(conn):
            conn.execute("DELETE FROM celeriac_revoked WHERE until < ?", (time.time(),))
            conn.executemany("INSERT OR REPLACE INTO celeriac_revoked (task_id, until) "
                             "VALUES (?, ?)", [(t, until) for t in task_ids])
            # the newest REVOKES_MAX (a replaced row gets a new rowid: newest last)
            conn.execute("DELETE FROM celeriac_revoked WHERE rowid <= (SELECT rowid FROM "
                         "celeriac_revoked ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                         (control.REVOKES_MAX,))

    def revoked(self) -> dict[str, float]:
        rows = retry_busy(self._all, "SELECT task_id, until FROM celeriac_revoked "
                          "WHERE until >= ?", (time.time(),))
        return dict(rows)

    def heartbeat(self, node: str, at: float) -> None:
        conn = self.connections.get()
        with write_transaction(conn):
            conn.execute("INSERT OR REPLACE INTO celeriac_workers (node, heartbeat) "
                         "VALUES (?, ?)", (node, at))

    def stale_nodes(self, before: float) -> dict[str, float]:
        return dict(retry_busy(self._all, "SELECT node, heartbeat FROM celeriac_workers "
                               "WHERE heartbeat < ?", (before,)))

    def claim_node(self, node: str, before: float, now: float) -> list[str] | None:
        conn = self.connections.get()
        with write_transaction(conn):
            cur = conn.execute("UPDATE celeriac_workers SET heartbeat = ? "
                               "WHERE node = ? AND heartbeat < ?", (now, node, before))
            if cur.rowcount == 0:
                return None
            rows = conn.execute("SELECT task_id FROM celeriac_worker_tasks WHERE node = ? "
                                "ORDER BY task_id", (node,)).fetchall()
        return [r[0] for r in rows]

    def forget_node(self, node: str) -> None:
        conn = self.connections.get()
        with write_transaction(conn):
            conn.execute("DELETE FROM celeriac_workers WHERE node = ?", (node,))
            conn.execute("DELETE FROM celeriac_worker_tasks WHERE node = ?", (node,))

    def waiting(self, task_ids: Sequence[str]) -> list[str]:
        found = []
        for i in range(0, len(task_ids), CHUNK):
            chunk = list(task_ids[i:i + CHUNK])
            marks = ", ".join("?" * len(chunk))
            stored = dict(retry_busy(self._all, "SELECT task_id, status FROM celeriac_task_meta "
                                     f"WHERE task_id IN ({marks})", tuple(chunk)))
            latest = dict(retry_busy(
                self._all, "SELECT task_id, state FROM celeriac_task_history WHERE seq IN "
                f"(SELECT MAX(seq) FROM celeriac_task_history WHERE task_id IN ({marks}) "
                "GROUP BY task_id)", tuple(chunk)))
            found += [t for t in chunk if states.is_waiting(stored.get(t), latest.get(t))]
        return found

    def forget(self, task_id: str) -> None:
        check_task_id(task_id)
        conn = self.connections.get()
        with write_transaction(conn):
            conn.execute("DELETE FROM celeriac_task_meta WHERE task_id = ?", (task_id,))
            conn.execute("DELETE FROM celeriac_task_history WHERE task_id = ?", (task_id,))

    def cleanup(self, older_than: float) -> int:
        """Ready results last written before ``older_than``, and the histories of tasks
        sent before it that no worker ever took (nothing stored, the newest entry the
        producer's PENDING)."""
        conn = self.connections.get()
        expired = f"status IN ({_READY_SQL}) AND updated_at < ?"
        with write_transaction(conn):
            conn.execute(
                "DELETE FROM celeriac_task_history WHERE task_id IN "
                f"(SELECT task_id FROM celeriac_task_meta WHERE {expired})", (older_than,))
            cur = conn.execute(f"DELETE FROM celeriac_task_meta WHERE {expired}", (older_than,))
            removed = cur.rowcount
            cur = conn.execute(
                "DELETE FROM celeriac_task_history WHERE task_id IN ("
                " SELECT task_id FROM celeriac_task_history WHERE seq IN"
                "  (SELECT MAX(seq) FROM celeriac_task_history GROUP BY task_id)"
                " AND state = ? AND timestamp < ? AND task_id NOT IN"
                "  (SELECT task_id FROM celeriac_task_meta))", (states.PENDING, older_than))
        return removed + cur.rowcount

    def exists(self, task_id: str) -> bool:
        row = retry_busy(self._one, "SELECT 1 FROM celeriac_task_meta WHERE task_id = ? UNION ALL "
                         "SELECT 1 FROM celeriac_task_history WHERE task_id = ? LIMIT 1",
                         (task_id, task_id))
        return row is not None

    def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        return self.connections.read(sql, params, lambda cur: cur.fetchone())

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        return self.connections.read(sql, params, lambda cur: cur.fetchall())

    def _wait_for_change(self, task_id: str, timeout: float, attempt: int) -> None:
        """Sleep on the results bell, on one listener the process's threads share."""
        shared = shared_listener(self._bell_dir)
        seen: int | None = getattr(self._local, "seen", None)
        if attempt == 0 or seen is None:
            # Listen first, then let the caller read again: no ring can fall in between.
            self._local.seen = shared.start()
            return
        shared.wait(seen, min(timeout, WAIT_RECHECK))
        self._local.seen = shared.start()

    def close(self) -> None:
        self.connections.close()
        shared_listener(self._bell_dir).close()
