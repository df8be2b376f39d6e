"""The embedded broker: one SQLite file, no server.

Layout (inspect it with ``sqlite3 celeriac.db``)::

    celeriac_messages(id, queue, priority, visible_at, owner, deliveries, payload)
    celeriac_dead_letters(id, queue, payload, reason, failed_at)   the newest 10,000, a week
    celeriac_broadcasts(seq, body, sent_at)   remote-control commands, kept an hour

``payload`` is kombu's JSON envelope (the same bytes the Redis transport keeps in
its lists).  A message is *waiting* when ``owner`` is NULL; a consumer takes a
batch by setting ``owner`` and pushing ``visible_at`` one lease ahead, in one
statement.  It renews the lease while it holds the message and deletes the row
on ack.  If its process dies the lease lapses and the next fetch takes the row
again (``deliveries`` counts the hand-outs).  A message with an ``eta`` header is
written with ``visible_at`` at that time (or at its ``expires``, if sooner), so it waits
in the file, not in a worker.
Publishers ring a bell (celeriac.bell) so idle consumers wake at once instead of
polling.  Each worker process reads new broadcasts every CONTROL_POLL seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .._sqlite import (
    ThreadConnections,
    is_busy,
    lock_pauses,
    path_from_url,
    retry_busy,
    write_transaction,
)
from ..bell import Bell, Listener, bell_dir
from ..protocol import Message, decode_envelope, encode_envelope
from .base import Broker, Consumer, dead_letter_caps, undecodable

if TYPE_CHECKING:
    from ..backends.base import Backend, Record, Roster
    from ..backends.sqlite import SQLiteBackend

SCHEMA = """
CREATE TABLE IF NOT EXISTS celeriac_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    owner TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS celeriac_messages_order
    ON celeriac_messages (queue, priority DESC, id);
CREATE TABLE IF NOT EXISTS celeriac_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS celeriac_broadcasts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    sent_at REAL NOT NULL
);
"""
#: How often a worker process reads new broadcasts (seconds), and how long they are kept.
CONTROL_POLL = 0.25
BROADCASTS_KEPT = 3600.0

T = TypeVar("T")
log = logging.getLogger("celeriac.broker")
_INSERT = ("INSERT INTO celeriac_messages (queue, priority, visible_at, payload) "
           "VALUES (?, ?, ?, ?)")

#: Default lease: how long a message stays with a consumer that stopped renewing it.
DEFAULT_VISIBILITY_TIMEOUT = 30.0
#: Idle consumers re-check this often even without a ring (lapsed leases, lost rings).
IDLE_RECHECK = 1.0


class SQLiteBroker(Broker):
    def __init__(self, url: str, transport_options: dict[str, object] | None = None) -> None:
        self.url = url
        self.path = path_from_url(url)
        options = transport_options or {}
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)  # type: ignore[arg-type]
        )
        self.dead_letter_limit, self.dead_letter_max_age = dead_letter_caps(options)
        self.connections = ThreadConnections(self.path, SCHEMA)
        self.bell_dir = bell_dir(self.path, "queues")
        self._bell: Bell | None = None

    @property
    def bell(self) -> Bell:
        if self._bell is None:
            self._bell = Bell(self.bell_dir)
        return self._bell

    def _row(self, message: Message) -> tuple[str, int, float, bytes]:
        priority = int(message.properties.get("priority") or 0)
        eta, expires = message.headers.get("eta"), message.headers.get("expires")
        visible_at = time.time()
        if eta:
            visible_at = datetime.fromisoformat(eta).timestamp()
            if expires:  # expiring before it is due: a worker sees it (revokes it) then
                visible_at = min(visible_at, datetime.fromisoformat(expires).timestamp())
        return (message.queue, priority, visible_at, encode_envelope(message))

    def publish(self, message: Message) -> None:
        retry_busy(self.connections.get().execute, _INSERT, self._row(message))
        self.bell.ring()

    def publish_after(self, backend: Backend, records: Sequence[Record],
                      message: Message) -> None:
        from ..backends.sqlite import SQLiteBackend

        if not (isinstance(backend, SQLiteBackend) and backend.path == self.path):
            super().publish_after(backend, records, message)
            return
        row = self._row(message)
        backend.ensure_tables()
        conn = self.connections.get()
        with write_transaction(conn):  # one file: history and message in one transaction
            backend.apply(conn, records)
            conn.execute(_INSERT, row)
        backend.after_commit(records)
        self.bell.ring()

    def purge(self, queues: Sequence[str]) -> int:
        marks = ",".join("?" * len(queues))
        cur = retry_busy(
            self.connections.get().execute,
            f"DELETE FROM celeriac_messages WHERE queue IN ({marks}) "
            "AND (owner IS NULL OR visible_at <= ?)",  # a lapsed lease: its consumer is gone
            (*queues, time.time()),
        )
        return cur.rowcount

    def consumer(self, queues: Sequence[str], *, name: str, io: Executor) -> Consumer:
        return SQLiteConsumer(self, list(queues), name, io)

    def broadcast(self, command: dict[str, Any]) -> None:
        conn = self.connections.get()
        with write_transaction(conn):
            now = time.time()
            conn.execute("DELETE FROM celeriac_broadcasts WHERE sent_at < ?",
                         (now - BROADCASTS_KEPT,))
            conn.execute("INSERT INTO celeriac_broadcasts (body, sent_at) VALUES (?, ?)",
                         (json.dumps(command), now))

    def last_broadcast(self) -> int:
        """The seq of the newest broadcast (0: none)."""
        row = self.connections.get().execute(
            "SELECT coalesce(max(seq), 0) FROM celeriac_broadcasts").fetchone()
        return int(row[0])

    def broadcasts_after(self, seq: int) -> list[tuple[int, str]]:
        """``(seq, body)`` of the broadcasts after ``seq``, oldest first."""
        return self.connections.get().execute(
            "SELECT seq, body FROM celeriac_broadcasts WHERE seq > ? ORDER BY seq",
            (seq,)).fetchall()

    def trim_dead_letters(self, conn: sqlite3.Connection) -> None:
        """Keep the dead letters within their caps (inside the caller's transaction)."""
        if self.dead_letter_limit:
            conn.execute("DELETE FROM celeriac_dead_letters WHERE id <= "
                         "(SELECT id FROM celeriac_dead_letters ORDER BY id DESC "
                         "LIMIT 1 OFFSET ?)", (self.dead_letter_limit,))
        if self.dead_letter_max_age:
            conn.execute("DELETE FROM celeriac_dead_letters WHERE failed_at < ?",
                         (time.time() - self.dead_letter_max_age,))

    def dead_letters(self) -> list[tuple[str, str, bytes]]:
        """(queue, reason, payload) of every message set aside, oldest first."""
        conn = self.connections.get()
        sql = "SELECT queue, reason, payload FROM celeriac_dead_letters ORDER BY id"
        return retry_busy(lambda: conn.execute(sql).fetchall())

    def close(self) -> None:
        self.connections.close()
        if self._bell is not None:
            self._bell.close()
            self._bell = None


class SQLiteConsumer(Consumer):
    """Runs every SQLite call on the worker process's I/O thread, off its event loop."""

    cancel_safe = True  # get() takes messages in one synchronous step

    def __init__(self, broker: SQLiteBroker, queues: list[str], name: str,
                 io: Executor) -> None:
        self.broker = broker
        self.queues = queues
        self.name = name
        self.lease = broker.visibility_timeout
        self._listener = Listener(broker.bell_dir)
        self._rung: asyncio.Event | None = None
        self._held: set[int] = set()
        self._renewer: asyncio.Task[None] | None = None
        marks = ",".join("?" * len(queues))
        self._fetch_sql = (
            "UPDATE celeriac_messages SET owner = ?, visible_at = ?, deliveries = deliveries + 1 "
            "WHERE id IN (SELECT id FROM celeriac_messages "
            f"WHERE queue IN ({marks}) AND visible_at <= ? ORDER BY priority DESC, id LIMIT ?) "
            "RETURNING priority, id, queue, deliveries, payload"
        )
        self._due_sql = ("SELECT min(visible_at) FROM celeriac_messages "
                         f"WHERE queue IN ({marks}) AND owner IS NULL")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one short SQLite step on the loop thread; wait for the write lock without
        blocking the loop.  (On a thread, every statement would also queue for the GIL
        while holding the database's write lock, stalling every other process.)"""
        for pause in lock_pauses():
            try:
                return fn(*args)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
            await asyncio.sleep(pause)
        return fn(*args)  # the last try: raises if it is still locked

    def _start(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        rung = asyncio.Event()
        loop.add_reader(self._listener.fileno(), self._on_ring)
        self._renewer = loop.create_task(self._renew_forever())
        self._rung = rung
        return rung

    def _mark(self, mark: Callable[[], None]) -> None:
        """Mark the listener busy or idle; follow it if it had to bind a new socket."""
        fd, generation = self._listener.fileno(), self._listener.generation
        mark()
        if self._listener.generation != generation:
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)  # the old socket is closed already
            loop.add_reader(self._listener.fileno(), self._on_ring)

    def _on_ring(self) -> None:
        self._listener.drain()
        if self._rung is not None:
            self._rung.set()

    async def control(self, handle: Callable[[dict[str, Any]], None],
                      ready: Callable[[], None]) -> None:
        last = await self._call(self.broker.last_broadcast)
        ready()
        while True:
            await asyncio.sleep(CONTROL_POLL)
            for seq, body in await self._call(self.broker.broadcasts_after, last):
                last = seq
                try:
                    handle(json.loads(body))
                except Exception:
                    log.exception("remote-control command %r failed", body)

    async def get(self, limit: int, timeout: float) -> list[Message]:
        rung = self._rung or self._start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rung.clear()
            messages = await self._call(self._fetch, limit)
            if messages:
                self._mark(self._listener.busy)
                return messages
            if not self._listener.is_idle:
                self._mark(self._listener.idle)  # producers ring us from now on: look again
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            due = await self._call(self._next_due)  # a message with an eta wakes us too
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rung.wait(), min(remaining, IDLE_RECHECK, due))

    def _fetch(self, limit: int) -> list[Message]:
        conn = self.broker.connections.get()
        now = time.time()
        with write_transaction(conn, wait=False):
            rows = conn.execute(
                self._fetch_sql, (self.name, now + self.lease, *self.queues, now, limit)
            ).fetchall()
        rows.sort(key=lambda row: (-row[0], row[1]))  # RETURNING keeps no order
        messages = []
        for _priority, row_id, queue, deliveries, payload in rows:
            self._held.add(row_id)
            try:
                message = decode_envelope(payload, queue)
            except Exception as exc:  # anything, RecursionError too: set aside on its own
                message = undecodable(payload, queue, exc)
            message.tag = row_id
            message.redelivered = deliveries > 1
            messages.append(message)
        return messages

    def _next_due(self) -> float:
        """Seconds until the next waiting message of our queues becomes visible.

        Asked only when a fetch found nothing; it scans the waiting rows of our queues
        (an index for it cost 11% of throughput, measured), which is cheap while the
        queues hold few delayed messages."""
        conn = self.broker.connections.get()
        row = conn.execute(self._due_sql, (*self.queues,)).fetchone()
        return IDLE_RECHECK if row[0] is None else max(0.0, row[0] - time.time())

    async def ack(self, messages: Sequence[Message]) -> None:
        ids = [m.tag for m in messages]
        await self._call(self._ack, ids)

    def _ack(self, ids: list[int]) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn, wait=False):
            conn.executemany(
                "DELETE FROM celeriac_messages WHERE id = ? AND owner = ?",
                [(i, self.name) for i in ids],
            )
        self._held.difference_update(ids)

    async def settle(self, backend: Backend, records: Sequence[Record],
                     acks: Sequence[Message], io: Executor,
                     roster: Roster | None = None) -> None:
        from ..backends.sqlite import SQLiteBackend

        if not (isinstance(backend, SQLiteBackend) and backend.path == self.broker.path):
            await super().settle(backend, records, acks, io, roster)
            return
        await self._call(self._settle, backend, records, [m.tag for m in acks], roster)

    def _settle(self, backend: SQLiteBackend, records: Sequence[Record], ids: list[int],
                roster: Roster | None) -> None:
        """Results and acks in one transaction: the broker and the backend share the file."""
        backend.ensure_tables()
        conn = self.broker.connections.get()
        with write_transaction(conn, wait=False):
            backend.apply(conn, records, roster)
            conn.executemany(
                "DELETE FROM celeriac_messages WHERE id = ? AND owner = ?",
                [(i, self.name) for i in ids],
            )
        self._held.difference_update(ids)
        backend.after_commit(records)

    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        await self._call(self._reject, message.tag, requeue, reason)

    def _reject(self, row_id: int, requeue: bool, reason: str) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn, wait=False):
            if requeue:
                conn.execute(
                    "UPDATE celeriac_messages SET owner = NULL, visible_at = ? "
                    "WHERE id = ? AND owner = ?", (time.time(), row_id, self.name),
                )
            else:
                conn.execute(
                    "INSERT INTO celeriac_dead_letters (queue, payload, reason, failed_at) "
                    "SELECT queue, payload, ?, ? FROM celeriac_messages WHERE id = ?",
                    (reason, time.time(), row_id),
                )
                conn.execute("DELETE FROM celeriac_messages WHERE id = ?", (row_id,))
                self.broker.trim_dead_letters(conn)
        self._held.discard(row_id)
        if requeue:
            self.broker.bell.ring()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._call(self._renew)
            except Exception:  # keep renewing: a lapsed lease means a task run twice
                log.exception("renewing message leases failed; trying again")

    def _renew(self) -> None:
        if not self._held:
            return
        conn = self.broker.connections.get()
        until = time.time() + self.lease
        with write_transaction(conn, wait=False):
            conn.executemany(
                "UPDATE celeriac_messages SET visible_at = ? WHERE id = ? AND owner = ?",
                [(until, i, self.name) for i in self._held],
            )

    def _release_all(self) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn, wait=False):
            conn.execute(
                "UPDATE celeriac_messages SET owner = NULL, visible_at = ? WHERE owner = ?",
                (time.time(), self.name),
            )
        self._held.clear()
        self.broker.bell.ring()
        self.broker.connections.close()

    async def close(self) -> None:
        if self._rung is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
        if self._renewer is not None:
            self._renewer.cancel()
        await self._call(self._release_all)
        self._listener.close()
