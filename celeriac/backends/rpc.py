"""``rpc://``: states sent back to the caller as messages, as Celery's RPC backend does.

Nothing is stored on a server.  Every task message carries ``reply_to`` = the sending
process's reply queue (``app.oid``); the worker publishes each state of the task there
(default exchange, routing key = ``reply_to``, ``correlation_id`` = task id, body = the
Celery meta in ``result_serializer``, ``delivery_mode`` 1, or 2 with
``result_persistent``).  The caller declares its reply queue before its first task is
sent (durable, auto-delete, ``x-expires`` = ``result_expires``, as Celery declares it),
consumes it, and keeps the latest meta of each task in memory, where a ready one is
final.  Celery clients and workers speak the same messages, in either direction.

History: a celeriac worker adds the entries since the last state it sent (RECEIVED,
...) in an ``x-celeriac-history`` header of the next state message; from a Celery worker
the caller records each state as it arrives.  Only the process that sent a task can read
its states and history (that is what ``rpc://`` means), and they live as long as it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import amqp

from .. import serialization, states
from ..brokers.amqp import _parse
from ..protocol import check_task_id
from .base import PENDING_META, Backend, Record, Roster

if TYPE_CHECKING:
    from ..app import Celeriac

HISTORY_HEADER = "x-celeriac-history"


class RPCBackend(Backend):

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        seconds = self.expires_seconds
        self.queue_arguments = {"x-expires": int(seconds * 1000)} if seconds > 0 else {}
        self.delivery_mode = 2 if app.conf.get("result_persistent") else 1
        self._lock = threading.RLock()
        self._pid = 0
        self._conn: Any = None
        self._channel: Any = None
        self._consuming = ""
        self._metas: dict[str, tuple[str, bytes]] = {}
        self._histories: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._unsent: dict[str, list[dict[str, Any]]] = defaultdict(list)  # worker side

    # ------------------------------------------------------------------ connection

    def _open(self) -> Any:
        if self._pid != os.getpid() or self._channel is None:
            conn = amqp.Connection(**_parse(self.app.broker_url))
            conn.connect()
            self._conn, self._channel, self._pid = conn, conn.channel(), os.getpid()
            self._consuming = ""
        return self._channel

    def _listen(self) -> None:
        """Declare this process's reply queue and consume it (the caller's side)."""
        oid = self.app.oid
        channel = self._open()
        if self._consuming == oid:
            return
        channel.queue_declare(oid, durable=True, auto_delete=True,
                              arguments=self.queue_arguments)
        channel.basic_consume(oid, callback=self._on_reply, no_ack=True)
        self._consuming = oid

    def _drain(self, timeout: float) -> None:
        with self._lock:
            self._listen()
            try:
                self._conn.drain_events(timeout=timeout)
                while True:  # whatever else has arrived, without waiting
                    self._conn.drain_events(timeout=0)
            except TimeoutError:
                pass

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

    # ------------------------------------------------------------------ the contract

    def _get(self, task_id: str) -> bytes | None:
        self._drain(0)
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
        with self._lock:
            for r in records:
                if r.state is None:
                    if r.entry["state"] == states.PENDING:  # the caller's own "sent"
                        self._listen()
                        self._histories[r.task_id].append(dict(r.entry))
                    else:
                        self._unsent[r.task_id].append(dict(r.entry))
                    applied.append(True)
                    continue
                if not r.reply_to:  # nobody to tell (sent without reply_to)
                    applied.append(False)
                    continue
                entries = [*self._unsent.pop(r.task_id, []), r.entry]
                self._open().basic_publish(
                    amqp.Message(r.payload, content_type=self.content_type,
                                 content_encoding=serialization.get_serializer(
                                     self.serializer).content_encoding,
                                 correlation_id=r.task_id, delivery_mode=self.delivery_mode,
                                 application_headers={
                                     HISTORY_HEADER: serialization.json_dumps_lenient(entries)}),
                    exchange="", routing_key=r.reply_to)
                if r.state in states.READY_STATES:
                    self._unsent.pop(r.task_id, None)
                applied.append(True)
        return applied

    def history(self, task_id: str) -> list[dict[str, Any]]:
        self._drain(0)
        return [dict(e) for e in self._histories.get(task_id, ())]

    def forget(self, task_id: str) -> None:
        check_task_id(task_id)
        with self._lock:
            self._metas.pop(task_id, None)
            self._histories.pop(task_id, None)

    def exists(self, task_id: str) -> bool:
        self._drain(0)
        return task_id in self._metas or task_id in self._histories

    def _wait_for_change(self, task_id: str, timeout: float, attempt: int) -> None:
        self._drain(min(timeout, 1.0))

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = self._channel = None
        self._consuming = ""
