"""The result backend contract, and what every backend shares.

A backend keeps, per task id:

* the **meta**: Celery's stored result (``status``, ``result``, ``traceback``,
  ``children``, ``date_done``, ..., ``task_id``), encoded with ``result_serializer``
  exactly as Celery stores it, so either project reads the other's results;
* the **history**: every transition, oldest first, each an entry
  ``{"state", "timestamp", "hostname", "pid", "meta"}``.

A store implements five operations (``_get``, ``record``, ``history``, ``forget``,
``exists``); it may improve ``_wait_for_change``, ``waiting`` and ``permanent`` (which
of its errors retrying cannot mend), and implement
``cleanup``, the revoke record (``add_revoked`` / ``revoked``) and worker heartbeats
(``heartbeat`` / ``stale_nodes`` / ``claim_node`` / ``forget_node``, with the
:class:`Roster` that ``record`` takes).
``record`` is the only write: it applies a batch of :class:`Record`\\ s in order,
and for each one that sets a state it must apply :func:`celeriac.states.may_replace`
atomically with the write (a stored SUCCESS, FAILURE or REVOKED is never replaced),
appending the history entry only when the state was written.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import serialization, states
from ..exceptions import CeleriacError, TimeoutError
from ..protocol import RequestInfo, check_task_id, result_meta, stored_form

if TYPE_CHECKING:
    from ..app import Celeriac


@dataclass
class Record:
    """One write: a history entry, and (when ``state`` is set) the meta to store with it."""

    task_id: str
    entry: dict[str, Any]
    state: str | None = None
    payload: bytes | None = None
    reply_to: str | None = None  # the caller's reply queue (for rpc://)


@dataclass
class Roster:
    """Changes to the set of early-acked tasks a worker node is running, written with a
    batch of records: ``started`` before them, ``ended`` after them.  A peer that finds
    the node's heartbeat stale fails what the set still holds (WorkerLostError)."""

    node: str
    started: Sequence[str] = ()
    ended: Sequence[str] = ()


class RecordsRefused(CeleriacError):
    """Raised by a store that writes a batch record by record (Redis, file) when some
    records were refused for good (:meth:`Backend.permanent`): ``refused`` maps their
    positions in the batch to the error; every other record, and the roster, was written.
    Acks settled with the batch may not have been sent."""

    def __init__(self, refused: dict[int, BaseException]) -> None:
        self.refused = refused
        super().__init__(f"{len(refused)} records refused: "
                         + ", ".join(repr(e) for e in refused.values()))


def history_entry(state: str, meta: Any = None, *, hostname: str | None = None,
                  pid: int | None = None, timestamp: float | None = None) -> dict[str, Any]:
    return {
        "state": state,
        "timestamp": time.time() if timestamp is None else timestamp,
        "hostname": hostname if hostname is not None else socket.gethostname(),
        "pid": pid if pid is not None else os.getpid(),
        "meta": meta,
    }


def entry_for_user(entry: dict[str, Any]) -> dict[str, Any]:
    """A stored entry as ``AsyncResult.history`` returns it: timestamp as aware UTC datetime."""
    out = dict(entry)
    out["timestamp"] = datetime.fromtimestamp(float(entry["timestamp"]), UTC)
    return out


PENDING_META: dict[str, Any] = {"status": states.PENDING, "result": None, "traceback": None,
                                "children": [], "date_done": None}


class Backend(ABC):
    def __init__(self, app: Celeriac, url: str) -> None:
        self.app = app
        self.url = url
        conf = app.conf
        self.serializer = conf.result_serializer
        accept = conf.result_accept_content or conf.accept_content
        self.accept = serialization.accepted_content_types(accept)
        serializer = serialization.get_serializer(self.serializer)
        self.content_type = serializer.content_type
        self.content_encoding = serializer.content_encoding
        expires = conf.result_expires
        #: ``result_expires`` in seconds; 0 when results do not expire
        self.expires_seconds = float(
            (expires.total_seconds() if isinstance(expires, timedelta) else expires) or 0)

    # ------------------------------------------------------------------ the contract

    @abstractmethod
    def _get(self, task_id: str) -> bytes | None:
        """The stored meta bytes, or None."""

    @abstractmethod
    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        """Apply writes in order; for each, whether its state (or history entry) was
        written.  A store that keeps heartbeats applies ``roster`` in the same write."""

    def record_begin(self, records: Sequence[Record]) -> Callable[[], None]:
        """Start writing ``records`` and return a function that waits for the write to
        end, so a producer can publish meanwhile.  By default the write is done here and
        the function has nothing left to do."""
        self.record(records)
        return _nothing

    async def record_async(self, records: Sequence[Record], io: Executor,
                           roster: Roster | None = None) -> list[bool]:
        """:meth:`record` from a worker's event loop; by default on its ``io`` thread."""
        write = partial(self.record, records) if roster is None else partial(
            self.record, records, roster)  # (a store without heartbeats gets no roster)
        return await asyncio.get_running_loop().run_in_executor(io, write)

    @abstractmethod
    def history(self, task_id: str) -> list[dict[str, Any]]:
        """Stored history entries, oldest first."""

    @abstractmethod
    def forget(self, task_id: str) -> None:
        """Remove meta and history; forgetting an unknown id is not an error."""

    @abstractmethod
    def exists(self, task_id: str) -> bool:
        """Whether anything (meta or history) is stored for the id."""

    def permanent(self, exc: BaseException) -> bool:
        """Whether a write failed for good: the store refuses this very record (too big,
        a key of the wrong type, an id it cannot keep) and would refuse it again — as
        opposed to a store that is down, busy or restarting, which the worker waits for.
        The worker stores FAILURE in place of a ready state refused so, and drops any
        other record refused so; the rest of its writes go on.  These errors are
        permanent in every store; each store adds its own."""
        return isinstance(exc, CeleriacError | TypeError | ValueError | KeyError
                          | OverflowError | RecursionError)

    def cleanup(self, older_than: float) -> int:
        """Remove ready results (meta and history) last written before ``older_than``
        (epoch seconds), and the histories of tasks sent before it that no worker ever
        took (nothing stored, the newest entry the producer's PENDING); returns how many.
        The worker calls this for ``result_expires``.  A store that expires entries
        itself, or keeps nothing, leaves this as it is."""
        return 0

    # ------------------------------------------------------------------ revoke

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:  # noqa: B027
        """Keep ``task_ids`` as revoked until ``until`` (epoch seconds), where a worker
        that starts later reads them (:meth:`revoked`).  A store that keeps nothing does
        nothing: revokes then reach only the workers that are up."""

    def revoked(self) -> dict[str, float]:
        """The revoked task ids still in force, each with the time it lapses."""
        return {}

    def waiting(self, task_ids: Sequence[str]) -> list[str]:
        """Those of ``task_ids`` whose task has not started (:func:`states.is_waiting`)."""
        found = []
        for task_id in task_ids:
            history = self.history(task_id)
            if states.is_waiting(self.stored_state(task_id),
                                 history[-1]["state"] if history else None):
                found.append(task_id)
        return found

    # ------------------------------------------------------------------ worker heartbeats

    #: whether the store keeps worker heartbeats and rosters (a store that keeps nothing
    #: across processes cannot tell a peer that a worker's host was lost)
    keeps_heartbeats = False

    def heartbeat(self, node: str, at: float) -> None:  # noqa: B027
        """Note that worker ``node`` was alive at ``at`` (epoch seconds)."""

    def stale_nodes(self, before: float) -> dict[str, float]:
        """Worker nodes whose last heartbeat is older than ``before``, with its time."""
        return {}

    def claim_node(self, node: str, before: float, now: float) -> list[str] | None:
        """Take over a node whose heartbeat is still older than ``before``: atomically
        move its heartbeat to ``now`` (so no other peer takes it for a while) and return
        the task ids of its roster; None when it beat meanwhile or another peer took it."""
        return None

    def forget_node(self, node: str) -> None:  # noqa: B027
        """Remove the node's heartbeat and roster (it stopped, or it was taken over)."""

    def stored_state(self, task_id: str) -> str | None:
        """The stored state (None when nothing is stored)."""
        data = self._get(task_id)
        return None if data is None else str(self.decode_meta(data).get("status"))

    def _wait_for_change(self, task_id: str, timeout: float, attempt: int) -> None:
        """Block until the task's meta may have changed, or ``timeout`` s pass.

        The default polls with growing pauses (1 ms, 2 ms, 4 ms... up to 50 ms), so a
        short task's result is seen within a few ms and a long wait costs little.
        """
        time.sleep(min(timeout, 0.001 * (2 ** min(attempt, 6)), 0.05))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what this process holds."""

    # ------------------------------------------------------------------ shared behaviour

    def encode_meta(self, meta: dict[str, Any]) -> bytes:
        return serialization.dumps(meta, self.serializer)[2]

    def decode_meta(self, data: bytes) -> dict[str, Any]:
        meta: dict[str, Any] = serialization.loads(data, self.content_type, self.accept)
        return meta

    def get_meta(self, task_id: str) -> dict[str, Any]:
        data = self._get(task_id)
        if data is None:
            return dict(PENDING_META, task_id=task_id)
        return self.decode_meta(data)

    def prepare_record(
        self,
        task_id: str,
        state: str,
        result: Any = None,
        *,
        traceback: str | None = None,
        request: RequestInfo | None = None,
        hostname: str | None = None,
        entry_meta: Any = None,
    ) -> Record:
        """Build the Celery meta and the history entry for setting ``state``."""
        check_task_id(task_id)
        result = stored_form(result)
        date_done = self.app.now().isoformat() if state in states.READY_STATES else None
        meta = result_meta(task_id, state, result, traceback=traceback, date_done=date_done,
                           request=request, extended=bool(self.app.conf.result_extended))
        payload = self.encode_meta(meta)
        entry = history_entry(state, entry_meta, hostname=hostname)
        return Record(task_id, entry, state, payload,
                      reply_to=request.reply_to if request is not None else None)

    def store(self, task_id: str, state: str, result: Any = None, **kw: Any) -> bool:
        """Set one state now (under the transition rule); True when it was written."""
        return self.record([self.prepare_record(task_id, state, result, **kw)])[0]

    def append_history(self, task_id: str, state: str, meta: Any = None,
                       hostname: str | None = None) -> None:
        check_task_id(task_id)
        self.record([Record(task_id, history_entry(state, meta, hostname=hostname))])

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the task is ready; returns its meta or raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            meta = self.get_meta(task_id)
            if meta["status"] in states.READY_STATES:
                return meta
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("The operation timed out.")
            self._wait_for_change(task_id, remaining, attempt)
            attempt += 1


def _nothing() -> None:
    pass
