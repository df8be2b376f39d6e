"""``rpc://``: states sent back to the caller as messages, as Celery's RPC backend does.

Nothing is stored on a server but in RabbitMQ.  Every task message carries ``reply_to`` =
the sending process's reply queue (``app.oid``); the worker publishes each state of the
task there (default exchange, routing key = ``reply_to``, ``correlation_id`` = task id,
body = the Celery meta in ``result_serializer``).  The caller declares its reply queue
before its first task is sent, consumes it, and keeps the latest meta of each task in
memory, where a ready one is final.  Celery clients and workers speak the same messages,
in either direction.

A broker restart loses nothing here, unlike Celery's reply queues:

* the caller's reply queue is durable and *not* auto-delete (Celery's is auto-delete, so
  it vanishes when the connection drops, with every state sent meanwhile); it is removed
  by ``x-expires`` = ``result_expires`` (a day if results never expire) once no one has
  consumed it for that long, and at once when the caller closes its app or exits;
* a celeriac worker publishes states persistent (``delivery_mode`` 2) unless
  ``result_persistent`` is set to False, and with publisher confirms: a batch of states
  counts as written (and an ``acks_late`` message is acked) only once RabbitMQ has it;
* both sides reconnect: a publish that fails is retried by the worker's writer on a new
  connection; the caller's reads give what it already has while RabbitMQ is away and
  consume its reply queue again once it is back.

The revoke record is a RabbitMQ stream, ``celeriac.revoked``: ``revoke()`` appends the
ids with the time they lapse, and a worker reads it from its start up to a marker it
appends itself (see ``revoked``).

History: a celeriac worker adds the entries since the last state it sent (RECEIVED,
...) in an ``x-celeriac-history`` header of the next state message; from a Celery worker
the caller records each state as it arrives.  Only the process that sent a task can read
its states and history (that is what ``rpc://`` means), and they live as long as it does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import amqp

from .. import serialization, states
from ..brokers.amqp import _parse
from ..control import REVOKES_EXPIRE
from ..protocol import check_task_id
from .base import PENDING_META, Backend, Record, Roster

if TYPE_CHECKING:
    from ..app import Celeriac

log = logging.getLogger("celeriac.backend")

HISTORY_HEADER = "x-celeriac-history"
#: What a lost or refused connection raises (the connection is then opened again).
CONNECTION_ERRORS = (OSError, amqp.exceptions.AMQPError)
#: How long a publish waits for RabbitMQ's confirms before the connection is taken as lost.
CONFIRM_TIMEOUT = 30.0
#: A caller's read while RabbitMQ is away tries to reconnect at most this often (seconds).
RECONNECT_EVERY = 0.5
#: ``x-expires`` of a reply queue when results never expire (``result_expires`` 0/None).
REPLY_QUEUE_EXPIRES = 86400.0
#: The revoke record: a RabbitMQ stream (append-only; every reader reads it from the start
#: without taking anything away), entries dropped after a revoke lapses (small segments:
#: a stream drops whole segments).
REVOKE_STREAM = "celeriac.revoked"
REVOKE_STREAM_ARGUMENTS = {"x-queue-type": "stream", "x-max-age": f"{int(REVOKES_EXPIRE)}s",
                           "x-stream-max-segment-size-bytes": 1_000_000}
#: How long reading the revoke record waits for RabbitMQ (a stream may take a moment to
#: come back after a restart).
REVOKE_READ_TIMEOUT = 10.0


class RPCBackend(Backend):

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        seconds = self.expires_seconds if self.expires_seconds > 0 else REPLY_QUEUE_EXPIRES
        self.queue_arguments = {"x-expires": int(seconds * 1000)}
        # persistent unless the user turned it off (Celery's default is transient)
        self.delivery_mode = 1 if app.conf.get("result_persistent") is False else 2
        self._lock = threading.RLock()
        self._pid = 0
        self._conn: Any = None
        self._channel: Any = None
        self._consuming = ""
        self._declared = ""  # the reply queue this process declared (deleted at close)
        self._lost_at = 0.0  # when a connection was last found lost (0: it was not)
        self._published = 0  # publish sequence number on this channel (confirms)
        self._unconfirmed: set[int] = set()
        self._refused = False  # RabbitMQ nacked a publish of the current batch
        self._metas: dict[str, tuple[str, bytes]] = {}
        self._histories: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._unsent: dict[str, list[dict[str, Any]]] = defaultdict(list)  # worker side

    # ------------------------------------------------------------------ connection

    def _open(self) -> Any:
        if self._pid != os.getpid() or self._channel is None:
            if self._pid != os.getpid():
                self._conn = None  # the parent's connection is the parent's
                self._declared = ""
            self._reset()
            conn = amqp.Connection(**_parse(self.app.broker_url))
            conn.connect()
            channel = conn.channel()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            self._conn, self._channel, self._pid = conn, channel, os.getpid()
            self._consuming = ""
            self._published, self._unconfirmed = 0, set()
        return self._channel

    def _reset(self) -> None:
        """Drop the connection (lost, or refused a step): the next call opens a new one."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.collect()  # release the socket without a closing handshake
        self._conn = self._channel = None
        self._consuming = ""

    def _listen(self) -> None:
        """Declare this process's reply queue and consume it (the caller's side)."""
        oid = self.app.oid
        channel = self._open()
        if self._consuming == oid:
            return
        channel.queue_declare(oid, durable=True, auto_delete=False,
                              arguments=self.queue_arguments)
        channel.basic_consume(oid, callback=self._on_reply, no_ack=True)
        if not self._declared:  # nobody can read it once this process is gone
            atexit.register(self.close)
        self._consuming = self._declared = oid

    def _drain(self, timeout: float) -> None:
        """Take the states that have arrived (waiting up to ``timeout`` for the first).
        While RabbitMQ is away this keeps what it has, tries to reconnect at most every
        RECONNECT_EVERY seconds, and waits out ``timeout`` instead of failing."""
        with self._lock:
            if self._lost_at and time.monotonic() - self._lost_at < RECONNECT_EVERY:
                time.sleep(min(timeout, RECONNECT_EVERY))
                return
            try:
                self._listen()
                self._conn.drain_events(timeout=timeout)
                while True:  # whatever else has arrived, without waiting
                    self._conn.drain_events(timeout=0)
            except TimeoutError:
                pass
            except CONNECTION_ERRORS as exc:
                if not self._lost_at:
                    log.warning("rpc:// results: the connection to RabbitMQ is lost (%r); "
                                "reconnecting", exc)
                self._lost_at = time.monotonic()
                self._reset()
                time.sleep(min(timeout, RECONNECT_EVERY))
                return
            except Exception:
                # anything else (a channel error while RabbitMQ starts, ...): raised, and
                # the connection it left in an unknown state is not reused
                self._reset()
                raise
            if self._lost_at:
                log.info("rpc:// results: connected to RabbitMQ again")
                self._lost_at = 0.0

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._unconfirmed = {t for t in self._unconfirmed if t > tag}
        else:
            self._unconfirmed.discard(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._on_ack(tag, multiple)
        self._refused = True

    def _publish(self, messages: Sequence[tuple[amqp.Message, str]]) -> None:
        """Publish ``(message, reply queue)`` pairs and wait once for RabbitMQ's confirms
        of them all.  Raises on a lost connection (reset: the writer tries again on a new
        one) or a refused message."""
        try:
            channel = self._open()
            if not self._published:
                channel.confirm_select()
            self._refused = False
            for message, queue in messages:
                channel.basic_publish(message, exchange="", routing_key=queue)
                self._published += 1
                self._unconfirmed.add(self._published)
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while self._unconfirmed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("RabbitMQ did not confirm the published states")
                self._conn.drain_events(timeout=remaining)
        except CONNECTION_ERRORS:
            self._reset()
            raise
        if self._refused:
            raise amqp.exceptions.RecoverableConnectionError(
                "RabbitMQ refused a published state (nack)")

    def _on_reply(self, message: Any) -> None:
        task_id = message.properties.get("correlation_id")
        content_type = message.properties.get("content_type") or self.content_type
        body = message.body.encode() if isinstance(message.body, str) else bytes(message.body)
        try:
            meta = serialization.loads(body, content_type, self.accept)
            task_id = task_id or meta.get("task_id")
            state = str(meta["status"])
        except Exception:
            return  # not a result message: nothing to keep
        current = self._metas.get(task_id)
        if states.may_replace(current[0] if current else None, state):
            self._metas[task_id] = (state, body)
            headers = message.properties.get("application_headers") or {}
            entries = headers.get(HISTORY_HEADER)
            if entries:
                self._histories[task_id].extend(json.loads(entries))
            else:  # a Celery worker: record the state as it arrives
                self._histories[task_id].append({
                    "state": state, "timestamp": time.time(),
                    "hostname": meta.get("worker"), "pid": None, "meta": None})

    # ------------------------------------------------------------------ revoke record

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:
        """Append ``{"revoked": [ids], "until": epoch s}`` to the revoke stream, with a
        publisher confirm: a worker that starts later reads it."""
        if not task_ids:
            return
        entry = amqp.Message(json.dumps({"revoked": list(task_ids), "until": until}),
                             content_type="application/json", delivery_mode=2)
        with self._lock:
            try:
                self._append_revoked(entry)
            except CONNECTION_ERRORS:  # a connection RabbitMQ dropped meanwhile
                self._reset()
                self._append_revoked(entry)

    def _append_revoked(self, entry: amqp.Message) -> None:
        self._open().queue_declare(REVOKE_STREAM, durable=True, auto_delete=False,
                                   arguments=REVOKE_STREAM_ARGUMENTS)
        self._publish([(entry, REVOKE_STREAM)])

    def revoked(self) -> dict[str, float]:
        """Read the revoke stream from its start up to a marker this call appends (so
        up to now, exactly); waits up to REVOKE_READ_TIMEOUT s for RabbitMQ."""
        deadline = time.monotonic() + REVOKE_READ_TIMEOUT
        while True:
            try:
                with self._lock:
                    return self._read_revoked(deadline)
            except CONNECTION_ERRORS:
                with self._lock:
                    self._reset()
                if time.monotonic() + RECONNECT_EVERY > deadline:
                    raise
                time.sleep(RECONNECT_EVERY)

    def _read_revoked(self, deadline: float) -> dict[str, float]:
        marker = os.urandom(8).hex()
        self._append_revoked(amqp.Message(json.dumps({"marker": marker}),
                                          content_type="application/json", delivery_mode=2))
        reader = self._conn.channel()
        found: dict[str, float] = {}
        now = time.time()
        done = False

        def take(message: Any) -> None:
            nonlocal done
            reader.basic_ack(message.delivery_tag)
            try:  # untrusted: anything unexpected is skipped
                entry = json.loads(message.body)
            except ValueError:
                return
            if not isinstance(entry, dict):
                return
            if entry.get("marker") == marker:
                done = True
                return
            ids, until = entry.get("revoked"), entry.get("until")
            if isinstance(ids, list) and isinstance(until, int | float) and until > now:
                for task_id in ids:
                    if isinstance(task_id, str):
                        found[task_id] = max(float(until), found.get(task_id, 0.0))

        try:
            reader.basic_qos(0, 1000, False)
            reader.basic_consume(REVOKE_STREAM, callback=take,
                                 arguments={"x-stream-offset": "first"})
            while not done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("reading the revoke record took too long")
                self._conn.drain_events(timeout=remaining)
        finally:
            with contextlib.suppress(Exception):
                reader.close()
        return found

    # ------------------------------------------------------------------ the contract

    def _take(self, timeout: float = 0.0) -> None:
        """Take what has arrived on this process's reply queue; a process that sent no
        task has none (a worker asking whether a task ran already): nothing to take."""
        if self._declared and self._pid == os.getpid():
            self._drain(timeout)
        elif timeout:
            time.sleep(timeout)

    def _get(self, task_id: str) -> bytes | None:
        self._take()
        found = self._metas.get(task_id)
        return found[1] if found else None

    def get_meta(self, task_id: str) -> dict[str, Any]:
        data = self._get(task_id)
        if data is None:
            return dict(PENDING_META, task_id=task_id)
        return self.decode_meta(data)

    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        # no heartbeats here: ``roster`` is not kept (see ``keeps_heartbeats``)
        applied = []
        outgoing: list[tuple[amqp.Message, str]] = []
        taken: dict[str, list[dict[str, Any]]] = {}  # history entries the batch carries
        encoding = self.content_encoding
        with self._lock:
            for r in records:
                if r.state is None:
                    if r.entry["state"] == states.PENDING:  # the caller's own "sent"
                        try:  # before the task is sent: its states have a queue
                            self._listen()
                        except CONNECTION_ERRORS:  # a connection lost meanwhile: a new one
                            self._reset()
                            self._listen()
                        self._histories[r.task_id].append(dict(r.entry))
                    else:
                        self._unsent[r.task_id].append(dict(r.entry))
                    applied.append(True)
                    continue
                if not r.reply_to:  # nobody to tell (sent without reply_to)
                    applied.append(False)
                    continue
                carried = self._unsent.pop(r.task_id, [])
                taken.setdefault(r.task_id, []).extend(carried)
                entries = [*carried, r.entry]
                outgoing.append((amqp.Message(
                    r.payload, content_type=self.content_type, content_encoding=encoding,
                    correlation_id=r.task_id, delivery_mode=self.delivery_mode,
                    application_headers={
                        HISTORY_HEADER: serialization.json_dumps_lenient(entries)}),
                    r.reply_to))
                applied.append(True)
            try:
                if outgoing:
                    self._publish(outgoing)
            except Exception:  # tried again: the entries go with the next attempt
                for task_id, carried in taken.items():
                    self._unsent[task_id][:0] = carried
                raise
        return applied

    def history(self, task_id: str) -> list[dict[str, Any]]:
        self._take()
        return [dict(e) for e in self._histories.get(task_id, ())]

    def forget(self, task_id: str) -> None:
        check_task_id(task_id)
        with self._lock:
            self._metas.pop(task_id, None)
            self._histories.pop(task_id, None)

    def exists(self, task_id: str) -> bool:
        self._take()
        return task_id in self._metas or task_id in self._histories

    def _wait_for_change(self, task_id: str, timeout: float, attempt: int) -> None:
        self._take(min(timeout, 1.0))

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                if self._declared:  # nobody reads it any more
                    self._channel.queue_delete(self._declared)
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = self._channel = None
        self._consuming = self._declared = ""
