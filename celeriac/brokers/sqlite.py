"""The embedded broker: one SQLite file, no server.

Layout (inspect it with ``sqlite3 celeriac.db``)::

    celeriac_messages(id, queue, priority, visible_at, owner, deliveries, payload)
    celeriac_dead_letters(id, queue, payload, reason, failed_at)

``payload`` is kombu's JSON envelope (the same bytes the Redis transport keeps in
its lists).  A message is *waiting* when ``owner`` is NULL; a consumer takes a
batch by setting ``owner`` and pushing ``visible_at`` one lease ahead, in one
statement.  It renews the lease while it holds the message and deletes the row
on ack.  If its process dies the lease lapses and the next fetch takes the row
again (``deliveries`` counts the hand-outs).  A message with an ``eta`` header is
written with ``visible_at`` at that time, so it waits in the file, not in a worker.
Publishers ring a bell (celeriac.bell) so idle consumers wake at once instead of
polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from sqlite3 import Connection

from .._sqlite import ThreadConnections, path_from_url
from ..bell import Bell, Listener, bell_dir
from ..protocol import Message, decode_envelope, encode_envelope
from .base import Broker, Consumer

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
"""

#: Default lease: how long a message stays with a consumer that stopped renewing it.
DEFAULT_VISIBILITY_TIMEOUT = 30.0
#: Idle consumers re-check this often even without a ring (lapsed leases, lost rings).
IDLE_RECHECK = 1.0


@contextlib.contextmanager
def write_transaction(conn: Connection) -> Iterator[Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SQLiteBroker(Broker):
    def __init__(self, url: str, transport_options: dict[str, object] | None = None) -> None:
        self.url = url
        self.path = path_from_url(url)
        options = transport_options or {}
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT)  # type: ignore[arg-type]
        )
        self.connections = ThreadConnections(self.path, SCHEMA)
        self.bell_dir = bell_dir(self.path, "queues")
        self._bell: Bell | None = None

    @property
    def bell(self) -> Bell:
        if self._bell is None:
            self._bell = Bell(self.bell_dir)
        return self._bell

    def publish(self, message: Message) -> None:
        priority = int(message.properties.get("priority") or 0)
        eta = message.headers.get("eta")
        visible_at = datetime.fromisoformat(eta).timestamp() if eta else time.time()
        self.connections.get().execute(
            "INSERT INTO celeriac_messages (queue, priority, visible_at, payload) "
            "VALUES (?, ?, ?, ?)",
            (message.queue, priority, visible_at, encode_envelope(message)),
        )
        self.bell.ring()

    def purge(self, queues: Sequence[str]) -> int:
        marks = ",".join("?" * len(queues))
        cur = self.connections.get().execute(
            f"DELETE FROM celeriac_messages WHERE owner IS NULL AND queue IN ({marks})",
            tuple(queues),
        )
        return cur.rowcount

    def consumer(self, queues: Sequence[str], *, name: str) -> Consumer:
        return SQLiteConsumer(self, list(queues), name)

    def dead_letters(self) -> list[tuple[str, str, bytes]]:
        """(queue, reason, payload) of every message set aside, oldest first."""
        rows = self.connections.get().execute(
            "SELECT queue, reason, payload FROM celeriac_dead_letters ORDER BY id"
        )
        return list(rows)

    def close(self) -> None:
        self.connections.close()
        if self._bell is not None:
            self._bell.close()
            self._bell = None


class SQLiteConsumer(Consumer):
    """Runs every SQLite call on one thread of its own, off the worker's event loop."""

    def __init__(self, broker: SQLiteBroker, queues: list[str], name: str) -> None:
        self.broker = broker
        self.queues = queues
        self.name = name
        self.lease = broker.visibility_timeout
        self._io = ThreadPoolExecutor(1, thread_name_prefix="celeriac-broker")
        self._listener = Listener(broker.bell_dir)
        self._rung: asyncio.Event | None = None
        self._held: set[int] = set()
        self._renewer: asyncio.Task[None] | None = None
        marks = ",".join("?" * len(queues))
        self._fetch_sql = (
            "UPDATE celeriac_messages SET owner = ?, visible_at = ?, deliveries = deliveries + 1 "
            "WHERE id IN (SELECT id FROM celeriac_messages "
            f"WHERE queue IN ({marks}) AND visible_at <= ? ORDER BY priority DESC, id LIMIT ?) "
            "RETURNING id, queue, deliveries, payload"
        )

    async def _call(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def _start(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        rung = asyncio.Event()
        loop.add_reader(self._listener.fileno(), self._on_ring)
        self._renewer = loop.create_task(self._renew_forever())
        self._rung = rung
        return rung

    def _on_ring(self) -> None:
        self._listener.drain()
        if self._rung is not None:
            self._rung.set()

    async def get(self, limit: int, timeout: float) -> list[Message]:
        rung = self._rung or self._start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            rung.clear()
            messages = await self._call(self._fetch, limit)
            if messages:
                return messages
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rung.wait(), min(remaining, IDLE_RECHECK))

    def _fetch(self, limit: int) -> list[Message]:
        conn = self.broker.connections.get()
        now = time.time()
        with write_transaction(conn):
            rows = conn.execute(
                self._fetch_sql, (self.name, now + self.lease, *self.queues, now, limit)
            ).fetchall()
        rows.sort()
        messages = []
        for row_id, queue, deliveries, payload in rows:
            self._held.add(row_id)
            try:
                message = decode_envelope(payload, queue)
            except ValueError as exc:  # the envelope itself is broken: keep the bytes visible
                message = Message({}, bytes(payload), "", "", {}, queue=queue)
                message.properties["celeriac_decode_error"] = str(exc)
            message.tag = row_id
            message.redelivered = deliveries > 1
            messages.append(message)
        return messages

    async def ack(self, messages: Sequence[Message]) -> None:
        ids = [m.tag for m in messages]
        await self._call(self._ack, ids)

    def _ack(self, ids: list[int]) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn):
            conn.executemany(
                "DELETE FROM celeriac_messages WHERE id = ? AND owner = ?",
                [(i, self.name) for i in ids],
            )
        self._held.difference_update(ids)

    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        await self._call(self._reject, message.tag, requeue, reason)

    def _reject(self, row_id: int, requeue: bool, reason: str) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn):
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
        self._held.discard(row_id)
        if requeue:
            self.broker.bell.ring()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self._call(self._renew)

    def _renew(self) -> None:
        if not self._held:
            return
        conn = self.broker.connections.get()
        until = time.time() + self.lease
        with write_transaction(conn):
            conn.executemany(
                "UPDATE celeriac_messages SET visible_at = ? WHERE id = ? AND owner = ?",
                [(until, i, self.name) for i in self._held],
            )

    def _release_all(self) -> None:
        conn = self.broker.connections.get()
        with write_transaction(conn):
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
        self._io.shutdown(wait=True)
