"""The ordered, batched writes of one worker process.

Every write of a worker process — history entries, states, results, the node's roster
and acks — goes through its one :class:`Writer`, which keeps them in the order they
were queued and applies whatever has piled up as one batch: one backend transaction
where the store allows, one multi-ack.  The lifecycle hooks only queue effects here;
they do no I/O themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from .. import connection, states
from ..backends.base import Record, RecordsRefused, Roster
from ..connection import describe
from ..exceptions import BackendStoreError
from ..protocol import Message, stored_form

if TYPE_CHECKING:
    from .process import WorkerProcess

log = logging.getLogger("celeriac.worker")

#: A write batch waits at most this long (seconds) for running tasks to add theirs,
#: and stops waiting once it holds this many records.
COALESCE_FOR = 0.002
COALESCE_MAX = 256
#: Pauses between attempts at a write the store did not take (seconds; then 8 s each).
WRITE_RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)


class Writer:
    """Orders and batches the writes of one worker process."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self._records: list[Record] = []
        self._acks: list[Message] = []
        self._early: list[Message] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._after: list[Callable[[], None]] = []
        #: task id -> whether it is running, since the last batch (the node's roster)
        self._roster: dict[str, bool] = {}
        self._noted: set[str] = set()  # ids the stored roster holds, as far as we wrote
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def record(self, record: Record) -> None:
        self._records.append(record)
        self._kick()

    def ack(self, message: Message, *, early: bool = False) -> None:
        """Ack ``message`` after the writes queued before it; an ``early`` ack (the task
        just started) on a broker where an ack is a one-way frame goes out at once."""
        if early and self.process.consumer.acks_are_frames:
            self._early.append(message)
        else:
            self._acks.append(message)
        self._kick()

    def running(self, task_id: str) -> None:
        """An early-acked task started: note it in the node's roster with the records
        queued so far (so a peer can fail it if this host is lost)."""
        self._roster[task_id] = True

    def ended(self, task_id: str) -> None:
        """The task's last write is queued: drop it from the roster with (or after) it."""
        self._roster[task_id] = False
        self._kick()

    def _take_roster(self) -> Roster | None:
        """The roster change of this batch; a task that started and ended since the last
        batch (most short tasks) costs nothing."""
        node = self.process.node
        changes, self._roster = self._roster, {}
        if node is None:
            return None
        started = [t for t, on in changes.items() if on and t not in self._noted]
        ended = [t for t, on in changes.items() if not on and t in self._noted]
        self._noted.update(started)
        self._noted.difference_update(ended)
        return Roster(node, started, ended) if started or ended else None

    def after(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued so far has been written."""
        self._after.append(callback)
        self._kick()

    def written(self) -> asyncio.Future[None]:
        """A future resolved when everything queued so far has been written."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._kick()
        return fut

    def _kick(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def flushed(self) -> None:
        await self._idle.wait()

    def progress(self) -> None:
        """A task finished: a write batch that waits for more may go now."""
        self._progress.set()

    async def _gather(self) -> None:
        """While other tasks of this process are still running, give them up to
        COALESCE_FOR seconds to add their writes to this batch: one transaction for
        several tasks.  A lone task (a round trip), or a write someone waits for
        (``update_state`` from a ``def`` task), is written at once."""
        if self._waiters:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + COALESCE_FOR
        while (self.process.has_unfinished_work() and len(self._records) < COALESCE_MAX
               and not self._waiters):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except TimeoutError:
                return

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()  # anything queued from here on sets it again
            if self._early:
                early, self._early = self._early, []
                await self.process.consumer.ack(early)
            await self._gather()
            records, self._records = self._records, []
            acks, self._acks = self._acks, []
            waiters, self._waiters = self._waiters, []
            after, self._after = self._after, []
            roster = self._take_roster()
            error = None
            if records or acks or roster is not None:
                error = await self._write(records, acks, roster)
            for callback in after:
                callback()
            for fut in waiters:
                if not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
            if not (self._records or self._acks or self._early or self._after
                    or self._roster):
                self._idle.set()

    async def _write(self, records: list[Record], acks: list[Message],
                     roster: Roster | None) -> BaseException | None:
        """Write a batch; returns the error that made a record fail for good, if any.

        First all of it at once (one transaction where the stores allow).  If that fails,
        each record alone, then the acks, so one bad record cannot hold back or take down
        the others.  A store that is down is retried until it answers (with pauses up to
        8 s).  A record the store refuses for good (``Backend.permanent``: too big, a key
        of the wrong type, a bad id) is not retried: a task's end is replaced by FAILURE
        naming why it could not be stored (:meth:`_refused`), anything else is logged and
        dropped."""
        settle = self.process.consumer.settle
        backend, io = self.process.app.backend, self.process.io
        try:
            await settle(backend, records, acks, io, roster)
            return None
        except RecordsRefused as exc:  # the others (and the roster) are written
            log.warning("the store refused %d of %d records for good", len(exc.refused),
                        len(records))
            for i, reason in exc.refused.items():
                await self._refused(records[i], reason)
            if acks:
                await _retrying(partial(settle, backend, [], acks, io), f"{len(acks)} acks",
                                backend.permanent)
            return next(iter(exc.refused.values()))
        except Exception as exc:
            log.warning("writing %d results and %d acks failed (%s); writing them one by one",
                        len(records), len(acks), describe(exc))
        error: BaseException | None = None
        # the roster's additions before the records, its removals after them
        before = None if roster is None else Roster(roster.node, roster.started)
        after = None if roster is None else Roster(roster.node, (), roster.ended)
        if before is not None and before.started:
            await _retrying(partial(settle, backend, [], [], io, before), "the worker's roster",
                            backend.permanent)
        for record in records:
            failed = await _retrying(partial(settle, backend, [record], [], io),
                                     _what(record), backend.permanent, drop=False)
            if failed is not None:
                await self._refused(record, failed)
            error = error or failed
        if after is not None and after.ended:
            await _retrying(partial(settle, backend, [], [], io, after), "the worker's roster",
                            backend.permanent)
        if acks:
            await _retrying(partial(settle, backend, [], acks, io), f"{len(acks)} acks",
                            backend.permanent)
        return error

    async def _refused(self, record: Record, reason: BaseException) -> None:
        """The store refused ``record`` for good.  A task's end (a ready state) becomes
        FAILURE with a :class:`BackendStoreError` naming why, so nobody waits for a
        result that will never come; if even that is refused, it is logged and dropped.
        Any other record (a history entry, a custom state) is logged and dropped: the
        task goes on, and its end is stored as usual."""
        if record.state not in states.READY_STATES:
            log.error("dropped %s: the store refuses it (%s)", _what(record), describe(reason))
            return
        error = BackendStoreError(
            f"the {record.state} of task {record.task_id} could not be stored: "
            f"{describe(reason)}")
        log.error("%s; storing FAILURE in its place", error)
        backend, io = self.process.app.backend, self.process.io
        failure = backend.prepare_record(record.task_id, states.FAILURE, error,
                                         hostname=self.process.hostname,
                                         entry_meta=stored_form(error))
        failure.reply_to = record.reply_to
        await _retrying(partial(self.process.consumer.settle, backend, [failure], [], io),
                        f"the FAILURE of task {record.task_id} in place of its {record.state}",
                        backend.permanent)


def _what(record: Record) -> str:
    return f"the {record.entry['state']} of task {record.task_id}"


def _own_error(error: BaseException) -> BaseException:
    """The error of a write: a batch of one record refused gives that record's error."""
    if isinstance(error, RecordsRefused):
        return next(iter(error.refused.values()))
    return error


async def _retrying(write: Callable[[], Awaitable[None]], what: str,
                    permanent: Callable[[BaseException], bool], *,
                    drop: bool = True) -> BaseException | None:
    """Call ``write`` until it succeeds, pausing longer each time (up to 8 s), unless it
    fails for good (``permanent``): then the error is returned, not retried (and logged
    as dropped, unless the caller does something else with it: ``drop=False``)."""
    try:
        await connection.retrying(write, f"writing {what}",
                                  retry_if=lambda error: not permanent(_own_error(error)),
                                  pauses=WRITE_RETRY_DELAYS)
    except Exception as error:
        exc = _own_error(error)
        if drop:
            log.error("dropped %s: %s", what, describe(exc))
        return exc
    return None
