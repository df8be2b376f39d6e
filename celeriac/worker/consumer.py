"""One worker process: an event loop that consumes from the broker and runs tasks.

* ``async def`` tasks run on the loop; ``def`` tasks run one at a time on a task
  thread, so they never block the loop (or the other tasks' writes).
* Every write of this process — history entries, states, results and acks — goes
  through one :class:`Writer`, which keeps them in order and applies whatever has
  piled up as one batch (one backend transaction, one multi-ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import connection, states
from ..backends.base import Record, RecordsRefused, Roster, history_entry
from ..brokers.base import DECODE_ERROR
from ..control import REVOKES_EXPIRE, bound_revoked
from ..exceptions import (
    BackendStoreError,
    DecodeError,
    EncodeError,
    ExceptionInfo,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TaskRevokedError,
    TimeLimitExceeded,
    UnsafeTaskId,
)
from ..protocol import (
    Message,
    TaskCall,
    parse_task_message,
    retry_message,
    saferepr,
    task_id_of,
)
from ..serialization import accepted_content_types
from ..signals import (
    task_failure,
    task_received,
    task_rejected,
    task_revoked,
    task_unknown,
    worker_process_init,
    worker_process_shutdown,
)
from ..task import Outcome, Request, Task, _current, execute_async, execute_sync
from .execution import ActiveSlots, Interruptible, TaskThread

if TYPE_CHECKING:
    from ..app import Celeriac
    from ..brokers.base import Consumer

log = logging.getLogger("celeriac.worker")
#: An ETA further off than this (seconds) is kept in the broker until it is due, where
#: the broker can; nearer ones are waited for in the worker.
PARK_AFTER = 1.0

#: A ``def`` task that cannot start within this many seconds (the process's task thread
#: is busy) is handed back to the queue for another process, and this process stops
#: fetching until its thread is free.  Short tasks never wait this long.
HAND_BACK_AFTER = 0.05
#: Longest a starting worker process waits for the revoke record before it takes tasks.
REVOKES_LOAD_WAIT = 10.0
#: Exit status of a worker process that had to exit to stop a task (see STOP_GRACE).
EXIT_STUCK = 3
#: Exit status of a worker process whose writer failed (a bug: see the log).
EXIT_WRITER_FAILED = 4
#: A write batch waits at most this long (seconds) for running tasks to add theirs,
#: and stops waiting once it holds this many records.
COALESCE_FOR = 0.002
COALESCE_MAX = 256
#: A task stopped at its hard time limit or by revoke(terminate=True) that has not
#: stopped this many seconds later is abandoned: a def task's process is replaced.
STOP_GRACE = 1.0
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
                        len(records), len(acks), _describe(exc))
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
            log.error("dropped %s: the store refuses it (%s)", _what(record), _describe(reason))
            return
        error = BackendStoreError(
            f"the {record.state} of task {record.task_id} could not be stored: "
            f"{_describe(reason)}")
        log.error("%s; storing FAILURE in its place", error)
        backend, io = self.process.app.backend, self.process.io
        failure = backend.prepare_record(record.task_id, states.FAILURE, error,
                                         hostname=self.process.hostname,
                                         entry_meta=_exc_meta(error))
        failure.reply_to = record.reply_to
        await _retrying(partial(self.process.consumer.settle, backend, [failure], [], io),
                        f"the FAILURE of task {record.task_id} in place of its {record.state}",
                        backend.permanent)


def _what(record: Record) -> str:
    return f"the {record.entry['state']} of task {record.task_id}"


def _describe(error: BaseException) -> str:
    """``Class: message``, the message cut to a few hundred characters."""
    text = str(error)
    return f"{type(error).__name__}: {text if len(text) <= 300 else text[:300] + '...'}"


@dataclass(eq=False)
class Running:
    """A task this process is running, for time limits and ``revoke(terminate=True)``."""

    call: TaskCall
    task: Task[Any, Any]
    request: Request
    job: asyncio.Future[Outcome] | None = None
    #: set to the outcome that stops the task (REVOKED when terminated)
    stop: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


def time_limits(call: TaskCall, task: Task[Any, Any],
                conf: Any) -> tuple[float | None, float | None]:
    """``(hard, soft)`` in seconds: the message's ``timelimit`` header, else the task's
    options, else the worker's ``task_time_limit`` / ``task_soft_time_limit``."""
    header = call.headers.get("timelimit") or (None, None)
    hard = header[0] or task.time_limit or conf.get("task_time_limit")
    soft = header[1] or task.soft_time_limit or conf.get("task_soft_time_limit")
    return (float(hard) if hard else None), (float(soft) if soft else None)


def _outcome_of(job: asyncio.Future[Outcome], started: float, now: float) -> Outcome:
    """What a finished job ended with; an exception escaping it (an interrupt that landed
    as the task returned, or an async task cancelled from within) is its FAILURE."""
    error = asyncio.CancelledError() if job.cancelled() else job.exception()
    if error is None:
        return job.result()
    return Outcome(states.FAILURE, error, None, now - started)


async def _retrying(write: Any, what: str, permanent: Callable[[BaseException], bool], *,
                    drop: bool = True) -> BaseException | None:
    """Call ``write`` until it succeeds, pausing longer each time (up to 8 s), unless it
    fails for good (``permanent``): then the error is returned, not retried (and logged
    as dropped, unless the caller does something else with it: ``drop=False``)."""
    pauses = iter(WRITE_RETRY_DELAYS)
    while True:
        try:
            await write()
            return None
        except Exception as error:
            # a batch of one record refused: its own error
            exc = next(iter(error.refused.values())) if isinstance(
                error, RecordsRefused) else error
            if permanent(exc):
                if drop:
                    log.error("dropped %s: %s", what, _describe(exc))
                return exc
            pause = next(pauses, WRITE_RETRY_DELAYS[-1])
            log.warning("writing %s failed (%s); retrying in %ss", what, _describe(exc), pause)
            await asyncio.sleep(pause)


class WorkerProcess:
    def __init__(self, app: Celeriac, queues: list[str], hostname: str,
                 task_thread: TaskThread, housekeeper: bool = False,
                 slots: ActiveSlots | None = None, node: str | None = None) -> None:
        self.app = app
        #: the worker node (supervisor) whose heartbeats cover this process's early-acked
        #: tasks: they are noted in its roster (None: no heartbeats, as in tests)
        self.node = node if app.backend.keeps_heartbeats else None
        self.housekeeper = housekeeper  # this process removes expired results
        self.queues = queues
        self.hostname = hostname
        self.accept = accepted_content_types(app.conf.accept_content)
        self.prefetch = max(1, int(app.conf.worker_prefetch_multiplier or 1))
        self.io = ThreadPoolExecutor(1, thread_name_prefix="celeriac-io")
        self.task_thread = task_thread
        self.slots = slots  # early-acked tasks running, shown to the supervisor
        self._active: dict[str, Running] = {}  # task id -> the task running it
        #: a def task would not stop: the process is to be replaced once shut down
        self.stuck = False
        #: revoked task ids -> when the revoke lapses (epoch s): from broadcasts, and
        #: from the result store's revoke record when the control channel (re)connects
        self.revoked: dict[str, float] = {}
        self._revokes_loaded = asyncio.Event()
        self._pruned = 0.0
        self.consumer: Consumer
        self.writer: Writer
        self.stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._slot_released = asyncio.Event()  # an ActiveSlots slot was given back
        self._sync_slot = asyncio.Semaphore(1)
        self._paused = False  # handed a message back: fetch nothing until the thread is free
        self._started: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        #: exits the process at once (set when it is a worker's own process)
        self.exit_now: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.loop_thread = threading.get_ident()
        name = f"{self.hostname}/{os.getpid()}/{os.urandom(3).hex()}"
        self.consumer = self.app.broker.consumer(self.queues, name=name, io=self.io)
        self.writer = Writer(self)
        writer_task = self._writer_task = loop.create_task(self.writer.run())
        writer_task.add_done_callback(self._writer_ended)
        expirer = loop.create_task(self._expire_results()) if self.housekeeper else None
        control = loop.create_task(self._listen())
        stop = loop.create_task(self.stopping.wait())
        first = asyncio.FIRST_COMPLETED
        broker_errors = 0
        try:
            # no task starts before the revoke record is read (and broadcasts are heard)
            loaded = loop.create_task(self._revokes_loaded.wait())
            await asyncio.wait({loaded, stop}, timeout=REVOKES_LOAD_WAIT, return_when=first)
            loaded.cancel()
            while not self.stopping.is_set():
                # a hand-back can race with the thread freeing up: never stay paused idle
                await self._unpause()
                room = self.prefetch - len(self._running)
                # refill in batches (half the prefetch at least) unless idle
                low = room < (self.prefetch + 1) // 2 and bool(self._running)
                if room <= 0 or low or self._paused:
                    self._slot_free.clear()
                    slot = loop.create_task(self._slot_free.wait())
                    await asyncio.wait({slot, stop}, return_when=first)
                    slot.cancel()
                    continue
                getter = loop.create_task(self.consumer.get(room, timeout=1.0))
                await asyncio.wait({getter, stop}, return_when=first)
                if not getter.done() and self.consumer.cancel_safe:
                    getter.cancel()
                # A fetch that cannot be cut short returns within its timeout; what it
                # took is released when the consumer closes.
                try:
                    messages = await getter
                except asyncio.CancelledError:
                    if not self.stopping.is_set():
                        raise
                    continue
                except Exception as exc:
                    pause = min(2.0 ** broker_errors * 0.1, 10.0)
                    broker_errors += 1
                    log.warning("fetching from the broker failed (%r); retrying in %.1fs",
                                exc, pause)
                    await asyncio.wait({stop}, timeout=pause)
                    continue
                broker_errors = 0
                for message in messages:
                    t = loop.create_task(self.handle(message))
                    self._running.add(t)
                    t.add_done_callback(self._finished)
        finally:
            stop.cancel()
            control.cancel()
            if expirer is not None:
                expirer.cancel()
            # let the control listener close its connection while the loop still runs
            # (at asyncio.run's exit its client's own tasks would be cancelled under it)
            await asyncio.wait({control}, timeout=5.0)
            await self._shutdown()
            writer_task.cancel()

    def _writer_ended(self, t: asyncio.Task[None]) -> None:
        """The writer only ends at shutdown; if a bug ends it sooner, nothing this process
        does can be written any more: it exits at once (in a worker's own process), and
        its supervisor fails its running tasks and starts a new one."""
        if t.cancelled():
            return
        log.critical("the writer of this worker process failed; the process exits",
                     exc_info=t.exception())
        if self.exit_now is not None:
            self.exit_now(EXIT_WRITER_FAILED)
        self.stopping.set()

    async def _expire_results(self) -> None:
        """``result_expires``: remove ready results older than that, every half of it
        (at least every hour, at most every second)."""
        seconds = self.app.backend.expires_seconds
        if seconds <= 0:
            return
        while True:
            await asyncio.sleep(min(max(seconds / 2, 1.0), 3600.0))
            try:
                removed = await self.loop.run_in_executor(
                    self.io, self.app.backend.cleanup, time.time() - seconds)
            except Exception:
                log.exception("removing expired results failed")
                continue
            if removed:
                log.info("removed %d results older than %ss", removed, seconds)

    # ------------------------------------------------------------------ remote control

    async def _listen(self) -> None:
        """Obey remote-control commands (``revoke``) for as long as the process runs."""
        while True:
            try:
                await self.consumer.control(self.on_command, self._reload_revoked)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for remote control failed (%r); retrying in 1s", exc)
                await asyncio.sleep(1.0)

    def _reload_revoked(self) -> None:
        """Listening (again): read the revoke record, for revokes made meanwhile."""
        async def load() -> None:
            try:
                found = await self.loop.run_in_executor(self.io, self.app.backend.revoked)
            except Exception as exc:
                log.warning("reading the revoked task ids failed: %r", exc)
                found = {}
            for task_id, until in found.items():
                self.revoked[task_id] = max(until, self.revoked.get(task_id, 0.0))
            bound_revoked(self.revoked)
            self._revokes_loaded.set()

        t = self.loop.create_task(load())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def on_command(self, body: dict[str, Any]) -> None:
        """One remote-control command (Celery's mailbox body)."""
        if not isinstance(body, dict):
            return
        destination = body.get("destination")
        if destination and self.hostname not in destination:
            return
        method, arguments = body.get("method"), body.get("arguments") or {}
        if method != "revoke":
            log.debug("remote control command %r is not supported; ignored", method)
            return
        ids = arguments.get("task_id") or []
        ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        until = time.time() + REVOKES_EXPIRE
        for task_id in ids:
            self.revoked.pop(task_id, None)  # newest last: the bound forgets the oldest
            self.revoked[task_id] = until
        bound_revoked(self.revoked)
        log.info("Tasks flagged as revoked: %s", ", ".join(ids))
        if arguments.get("terminate"):
            for task_id in ids:
                running = self._active.get(task_id)
                if running is not None and not running.stop.done():
                    log.warning("Terminating %s[%s] (revoked)", running.call.name, task_id)
                    running.stop.set_result(Outcome(
                        states.REVOKED, TaskRevokedError("terminated"), None, 0.0))
                    if task_revoked.receivers:
                        task_revoked.send(sender=running.task, request=running.request,
                                          terminated=True,
                                          signum=_signum(arguments.get("signal")),
                                          expired=False)
        if time.time() - self._pruned > 60:
            self._pruned = time.time()
            self.revoked = {t: u for t, u in self.revoked.items() if u >= self._pruned}

    async def _succeeded(self, call: TaskCall) -> bool:
        """Whether SUCCESS is stored for the task (asked of messages delivered again: a
        worker may have died after storing the result, before acking the message)."""
        try:  # a store that is away is waited for (stopping: handed back, see handle)
            stored = await connection.until_connected(
                partial(self.loop.run_in_executor, self.io, self.app.backend.stored_state,
                        call.id),
                f"reading the state of task {call.id}", self.stopping)
        except Exception as exc:
            if connection.lost(exc):
                raise
            log.warning("could not read the state of task %s[%s] (%r); running it",
                        call.name, call.id, exc)
            return False
        return stored == states.SUCCESS

    def _is_revoked(self, task_id: str) -> bool:
        until = self.revoked.get(task_id)
        return until is not None and until >= time.time()

    async def _will_not_run(self, message: Message, task: Task[Any, Any], call: TaskCall,
                            request: Request, ignore: bool) -> bool:
        """A task revoked or expired is not run: its message is acked and REVOKED is
        stored (reason ``revoked`` / ``expired``)."""
        if self._is_revoked(call.id):
            log.info("Discarding revoked task: %s[%s]", call.name, call.id)
            reason = "revoked"
        elif self._expired(call):
            log.info("Task %s[%s] expired: revoked", call.name, call.id)
            reason = "expired"
        else:
            return False
        self.writer.ack(message)
        await self._finish(task, call, request, Outcome(
            states.REVOKED, TaskRevokedError(reason), None, 0.0), ignore=ignore)
        if task_revoked.receivers:
            task_revoked.send(sender=task, request=request, terminated=False, signum=None,
                              expired=reason == "expired")
        return True

    def _finished(self, t: asyncio.Task[None]) -> None:
        self._running.discard(t)
        self._slot_free.set()
        self.writer.progress()
        if not t.cancelled() and t.exception() is not None:
            log.error("worker failed handling a message", exc_info=t.exception())

    async def _shutdown(self) -> None:
        """Warm shutdown: started tasks finish, prefetched ones go back to the queue."""
        for t in list(self._running):
            if t not in self._started:
                t.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await asyncio.sleep(0)  # the finished tasks' callbacks queue their last writes
        if self._writer_task is not None and not self._writer_task.done():
            await self.writer.flushed()
        await self.consumer.close()
        self.io.shutdown(wait=True)

    # ------------------------------------------------------------------ one message

    async def handle(self, message: Message) -> None:
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if connection.lost(exc):
                # the broker or store went away: never the task's fault.  The message goes
                # back to its queue once the broker answers (unless it was acked when its
                # task started: that task's outcome is queued in the writer already).
                me = asyncio.current_task()
                if me in self._started and not _acks_late(self.app, message, self.accept):
                    log.warning("lost the connection after task %s started (%r); its "
                                "outcome is written once the server is back",
                                task_id_of(message), exc)
                    return
                log.warning("lost the connection handling task %s (%r); it goes back to "
                            "its queue", task_id_of(message), exc)
                with contextlib.suppress(Exception):  # stopping: the broker redelivers it
                    await connection.until_connected(
                        partial(self.consumer.reject, message, requeue=True,
                                reason="connection lost"),
                        f"handing task {task_id_of(message)} back", self.stopping)
                return
            # a bug or a message we did not foresee: never leave it held
            log.exception("Unexpected error handling a message; setting it aside")
            with contextlib.suppress(Exception):
                await self._set_aside(message, f"unexpected error: {exc!r}", exc)

    async def _handle(self, message: Message) -> None:
        try:
            if DECODE_ERROR in message.properties:  # the consumer could not decode it
                raise DecodeError(message.properties[DECODE_ERROR])
            call = parse_task_message(message, self.accept)
        except (DecodeError, UnsafeTaskId) as exc:
            await self._set_aside(message, f"malformed message: {exc}", exc)
            if task_rejected.receivers:
                task_rejected.send(sender=self, message=message, exc=exc)
            return
        task = self.app.tasks.get(call.name)
        if task is None:
            log.error("Received unregistered task of type %r. The message has been set aside.",
                      call.name)
            error = NotRegistered(call.name)
            await self._set_aside(message, f"unregistered task {call.name!r}", error,
                                  task_id=call.id)
            if task_unknown.receivers:
                # as Celery: the registry's KeyError (NotRegistered is what is stored)
                task_unknown.send(sender=self, message=message, exc=KeyError(call.name),
                                  name=call.name, id=call.id)
            return
        request = self._request(call, task)
        ignore = bool(request.ignore_result or task._option("ignore_result"))
        if await self._will_not_run(message, task, call, request, ignore):
            return
        if task_received.receivers:
            task_received.send(sender=self, request=request)
        acks_late = bool(task._option("acks_late"))
        # delivered again: an acks_late task whose worker was lost, or an early ack lost
        # with its connection
        if message.redelivered and await self._succeeded(call):
            log.info("Task %s[%s] succeeded already: not run again (delivered again)",
                     call.name, call.id)
            self.writer.ack(message)
            return
        while (delay := self._eta_delay(call)) > 0:
            expires_in = self._expires_in(call)
            if expires_in is not None and expires_in < delay:
                # it expires before it is due: it waits until it expires, to be stored
                # REVOKED then rather than at its ETA
                delay = expires_in
            if delay > PARK_AFTER and await self.consumer.park(message, time.time() + delay):
                log.info("Task %s[%s] is due in %.1fs: kept in the broker until then",
                         call.name, call.id, delay)
                return
            await asyncio.sleep(delay)
            if await self._will_not_run(message, task, call, request, ignore):
                return

        if not acks_late and not self.consumer.holds(message):
            # taken before its connection dropped, its ack can no longer reach the
            # broker: started now, it would run again when the broker redelivers it
            log.warning("Task %s[%s] not started: its delivery was lost with the "
                        "connection; the broker delivers it again", call.name, call.id)
            return
        if task.is_async:
            slot = await self._take_slot(call, acks_late)
            self._start(message, call, task, request, acks_late, ignore, slot)
            outcome = await self._execute(task, call, request)
        else:
            if not await self._take_sync_slot():
                # Busy with a long task: let an idle process have it (it keeps its place).
                await self.consumer.reject(message, requeue=True, reason="process busy")
                return
            try:
                slot = await self._take_slot(call, acks_late)
                # revoked (or expired) while it waited for the thread or a slot
                if await self._will_not_run(message, task, call, request, ignore):
                    self._release_slot(slot)
                    return
                self._start(message, call, task, request, acks_late, ignore, slot)
                outcome = await self._execute(task, call, request)
            finally:
                if not self.stuck:  # else the thread never frees up: take nothing more
                    self._sync_slot.release()
                    await self._unpause()
                    self._slot_free.set()
        if outcome.state == states.RETRY:
            await self._retry(task, call, request, outcome, ignore=ignore)
        elif outcome.state == states.REJECTED:
            await self._rejected(message, task, call, request, outcome, acks_late, ignore)
            return
        elif outcome.state == states.IGNORED:
            log.info("Task %s[%s] ignored", call.name, call.id)
        else:
            await self._finish(task, call, request, outcome, ignore=ignore)
        if acks_late:
            self.writer.ack(message)

    async def _retry(self, task: Task[Any, Any], call: TaskCall, request: Request,
                     outcome: Outcome, ignore: bool) -> None:
        """``Task.retry``: store RETRY (with the exception it was given), and once that
        is written, queue the next attempt, same id, ``retries`` one more.  If it cannot
        be queued the task fails with the reason."""
        retry: Retry = outcome.value
        plan = retry.plan
        shown = retry.reason()
        log.info("Task %s[%s] retry: %s", call.name, call.id, retry)
        if not ignore:
            entry = {**_exc_meta(shown), "retries": plan.retries,
                     "eta": plan.eta.isoformat() if plan.eta else None}
            self.writer.record(self.app.backend.prepare_record(
                call.id, states.RETRY, shown, traceback=outcome.traceback,
                request=request.info(), hostname=self.hostname, entry_meta=entry))
            with contextlib.suppress(Exception):  # a refused write was logged already
                await self.writer.written()
        try:
            message = retry_message(call, retries=plan.retries, eta=plan.eta, args=plan.args,
                                    kwargs=plan.kwargs, queue=plan.queue,
                                    priority=plan.priority)
            # a broker that is away is waited for: never a reason for the task to fail
            await connection.until_connected(partial(
                self.loop.run_in_executor, self.io, self.app.publish, message,
                call.args if plan.args is None else plan.args,
                call.kwargs if plan.kwargs is None else plan.kwargs),
                f"queueing the retry of task {call.id}", self.stopping)
        except Exception as exc:
            log.error("Task %s[%s] could not be queued again for its retry: %r", call.name,
                      call.id, exc)
            await self._finish(task, call, request, Outcome(
                states.FAILURE, exc, None, outcome.runtime), ignore=ignore)

    async def _rejected(self, message: Message, task: Task[Any, Any], call: TaskCall,
                        request: Request, outcome: Outcome, acks_late: bool,
                        ignore: bool) -> None:
        """``raise Reject(reason, requeue=...)``.  With ``acks_late`` and ``requeue`` the
        message goes back on its queue and nothing is stored; otherwise the task is
        FAILURE with the Reject (as Celery 5.7 stores it), and an ``acks_late`` message
        is set aside in the dead letters with the reason."""
        reject: Reject = outcome.value
        if reject.requeue and acks_late:
            log.info("Task %s[%s] rejected: back on its queue (%r)", call.name, call.id,
                     reject.reason)
            # this attempt's history first, so the next one's entries come after it
            with contextlib.suppress(Exception):
                await self.writer.written()
            await self.consumer.reject(message, requeue=True, reason="rejected by the task")
            return
        if reject.requeue:
            log.warning("Task %s[%s] rejected with requeue=True, but its message was acked "
                        "when it started (acks_late is off): stored as FAILURE", call.name,
                        call.id)
        await self._finish(task, call, request, Outcome(
            states.FAILURE, reject, None, outcome.runtime), ignore=ignore)
        if acks_late:
            with contextlib.suppress(Exception):
                await self.writer.written()
            await self.consumer.reject(message, requeue=False,
                                       reason=f"rejected by the task: {reject.reason!r}")

    async def _unpause(self) -> None:
        if self._paused and not self._sync_slot.locked():
            self._paused = False
            await self.consumer.resume()

    async def _take_sync_slot(self) -> bool:
        """The task thread, if it frees up soon; False (and stop fetching) if it does not."""
        if not self._sync_slot.locked():
            await self._sync_slot.acquire()
            return True
        try:
            await asyncio.wait_for(self._sync_slot.acquire(), HAND_BACK_AFTER)
            return True
        except TimeoutError:
            if not self._paused:
                self._paused = True
                await self.consumer.pause()
            return False

    def has_unfinished_work(self) -> bool:
        """Whether tasks of this process have started and not yet finished."""
        return bool(self._started)

    async def _execute(self, task: Task[Any, Any], call: TaskCall,
                       request: Request) -> Outcome:
        """Run the task (async on the loop, def on the task thread) under its time limits.

        At the soft limit SoftTimeLimitExceeded is raised in the task, which may catch
        it.  At the hard limit, or when revoked with ``terminate``, the outcome is
        decided here (FAILURE TimeLimitExceeded, or REVOKED) and the task is stopped: an
        async task is cancelled; a def task gets TimeLimitExceeded / TaskRevokedError
        raised in it, and if it has not stopped STOP_GRACE seconds later the process is
        replaced, as only that can stop it."""
        hard, soft = time_limits(call, task, self.app.conf)
        running = Running(call, task, request)
        self._active[call.id] = running
        interruptible = None
        try:
            if task.is_async:
                ctx = contextvars.copy_context()
                ctx.run(_current.set, request)
                interruptible = Interruptible()
                wrap = interruptible.run if soft else None
                job: asyncio.Future[Outcome] = asyncio.create_task(
                    execute_async(task, request, wrap), context=ctx)
            else:
                job = asyncio.wrap_future(
                    self.task_thread.submit(running, execute_sync, task, request))
            running.job = job
            started = self.loop.time()
            if soft and (not hard or soft < hard):
                await asyncio.wait({job, running.stop}, timeout=soft)
                if not job.done() and not running.stop.done():
                    log.warning("Soft time limit (%ss) exceeded for %s[%s]", soft, call.name,
                                call.id)
                    exc = SoftTimeLimitExceeded(soft)
                    if interruptible is not None:
                        interruptible.throw(exc)
                    else:
                        self.task_thread.interrupt(running, exc)
            timeout = None if not hard else max(0.0, hard - (self.loop.time() - started))
            await asyncio.wait({job, running.stop}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if job.done():
                return _outcome_of(job, started, self.loop.time())
            if running.stop.done():
                outcome = running.stop.result()
            else:
                log.error("Hard time limit (%ss) exceeded for %s[%s]", hard, call.name,
                          call.id)
                error = TimeLimitExceeded(hard)
                outcome = Outcome(states.FAILURE, error, None, self.loop.time() - started)
                if task_failure.receivers:
                    task_failure.send(sender=task, task_id=call.id, exception=error,
                                      args=request.args, kwargs=request.kwargs,
                                      traceback=None, einfo=ExceptionInfo(error, ""))
            await self._halt(running, outcome.value)
            return outcome
        finally:
            del self._active[call.id]

    async def _halt(self, running: Running, exc: BaseException) -> None:
        """Stop a running task whose outcome is already decided (see :meth:`_execute`)."""
        job = running.job
        assert job is not None
        if running.task.is_async:
            job.cancel()
        else:
            self.task_thread.interrupt(running, exc)
        await asyncio.wait({job}, timeout=STOP_GRACE)
        if job.done():
            if not job.cancelled():
                job.exception()  # retrieved: what it ended with no longer counts
            return
        call = running.call
        if running.task.is_async:
            log.error("Task %s[%s] ignored its cancellation; it is left running",
                      call.name, call.id)
            return
        log.error("Task %s[%s] did not stop within %ss; this worker process will be "
                  "replaced", call.name, call.id, STOP_GRACE)
        self.stuck = True
        self.stopping.set()

    async def _take_slot(self, call: TaskCall, acks_late: bool) -> int | None:
        """A slot noting an early-acked task as running (see ActiveSlots), waiting for
        one to be released if all are taken: no such task starts unrecorded, or its
        end could never be stored if this process died.  None for acks_late tasks (the
        broker delivers them again) and where no supervisor watches."""
        if acks_late or self.slots is None:
            return None
        while (slot := self.slots.take(call.id, call.name)) is None:
            self._slot_released.clear()
            await self._slot_released.wait()
        return slot

    def _release_slot(self, slot: int | None) -> None:
        if slot is not None and self.slots is not None:
            self.slots.release(slot)
            self._slot_released.set()

    def _start(self, message: Message, call: TaskCall, task: Task[Any, Any], request: Request,
               acks_late: bool, ignore: bool, slot: int | None) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._started.add(me)
            me.add_done_callback(self._started.discard)
        if not ignore:
            self.writer.record(Record(call.id, history_entry(
                states.RECEIVED, {"retries": call.retries} if call.retries else None,
                hostname=self.hostname)))
        log.info("Task %s[%s] received", call.name, call.id)
        if not acks_late:
            # No broker will deliver it again: if this process dies, the supervisor fails
            # it (its slot); if the whole host is lost, a peer does (the node's roster).
            self.writer.ack(message, early=True)
            if not ignore:
                self.writer.running(call.id)
            if me is not None:
                me.add_done_callback(partial(self._ended, call.id, ignore, slot))
        if not ignore and task._option("track_started"):
            self.writer.record(self.app.backend.prepare_record(
                call.id, states.STARTED, {"pid": os.getpid(), "hostname": self.hostname},
                request=request.info(), hostname=self.hostname,
                entry_meta={"pid": os.getpid(), "hostname": self.hostname},
            ))

    def _ended(self, task_id: str, ignore: bool, slot: int | None, _: object) -> None:
        """An early-acked task's handling is over: its last write is queued."""
        if not ignore:
            self.writer.ended(task_id)
        if slot is not None:
            self.writer.after(partial(self._release_slot, slot))

    async def _finish(self, task: Task[Any, Any], call: TaskCall, request: Request,
                      outcome: Outcome, ignore: bool) -> None:
        backend = self.app.backend
        if outcome.state == states.SUCCESS and log.isEnabledFor(logging.INFO):
            log.info("Task %s[%s] succeeded in %.6fs: %s", call.name, call.id, outcome.runtime,
                     saferepr(outcome.value))
        elif outcome.state == states.FAILURE:
            log.error("Task %s[%s] raised unexpected: %r\n%s", call.name, call.id,
                      outcome.value, outcome.traceback)
        if ignore:
            return
        try:
            record = backend.prepare_record(
                call.id, outcome.state, outcome.value, traceback=outcome.traceback,
                request=request.info(), hostname=self.hostname,
                entry_meta=None if outcome.state == states.SUCCESS else _exc_meta(outcome.value),
            )
        except EncodeError as exc:
            error = EncodeError(f"result of task {call.name} cannot be stored: {exc}")
            log.error("Task %s[%s] %s", call.name, call.id, error)
            record = backend.prepare_record(
                call.id, states.FAILURE, error, traceback=None, request=request.info(),
                hostname=self.hostname, entry_meta=_exc_meta(error),
            )
        self.writer.record(record)

    async def _set_aside(self, message: Message, reason: str, exc: BaseException,
                         task_id: str | None = None) -> None:
        """A message that cannot run: store FAILURE when it has an id, dead-letter it."""
        task_id = task_id or task_id_of(message)
        log.error("Message %s set aside: %s", task_id or "(no usable id)", reason)
        if task_id is not None:
            record = self.app.backend.prepare_record(
                task_id, states.FAILURE, exc, hostname=self.hostname, entry_meta=_exc_meta(exc))
            self.writer.record(record)
            await self.writer.written()
        await connection.until_connected(
            partial(self.consumer.reject, message, requeue=False, reason=reason),
            f"setting message {task_id or '(no usable id)'} aside", self.stopping)

    # ------------------------------------------------------------------ helpers

    def _request(self, call: TaskCall, task: Task[Any, Any]) -> Request:
        from ..protocol import custom_headers

        h = call.headers
        props = call.message.properties
        request = Request(
            id=call.id, task=call.name, args=call.args, kwargs=call.kwargs,
            retries=call.retries, hostname=self.hostname,
            delivery_info=call.message.delivery_info, root_id=h.get("root_id"),
            parent_id=h.get("parent_id"), group=h.get("group"),
            correlation_id=props.get("correlation_id"), reply_to=props.get("reply_to"),
            origin=h.get("origin"), eta=h.get("eta"), expires=h.get("expires"),
            timelimit=tuple(h.get("timelimit") or (None, None)),  # type: ignore[arg-type]
            ignore_result=bool(h.get("ignore_result")), called_directly=False,
            headers=custom_headers(h),
        )
        request.state_sink = self._state_sink(request)
        return request

    def _state_sink(self, request: Request) -> Any:
        def sink(task_id: str, state: str, meta: Any) -> None:
            record = self.app.backend.prepare_record(
                task_id, state, meta, request=request.info(), hostname=self.hostname,
                entry_meta=meta)
            if threading.get_ident() == self.loop_thread:
                self.writer.record(record)  # an async task: ordered, not awaited
            else:
                asyncio.run_coroutine_threadsafe(self._write(record), self.loop).result()

        return sink

    async def _write(self, record: Record) -> None:
        self.writer.record(record)
        await self.writer.written()

    def _expired(self, call: TaskCall) -> bool:
        expires_in = self._expires_in(call)
        return expires_in is not None and expires_in <= 0

    def _expires_in(self, call: TaskCall) -> float | None:
        """Seconds until the message's ``expires`` (None when it has none)."""
        from ..protocol import aware_time

        expires = call.headers.get("expires")
        if not expires:
            return None
        try:  # a naive value is UTC, as Celery reads it
            return (aware_time(expires) - self.app.now()).total_seconds()
        except (TypeError, ValueError):
            return None

    def _eta_delay(self, call: TaskCall) -> float:
        """Seconds until the message's ``eta`` (0 when it has none or it has passed)."""
        from ..protocol import aware_time

        eta = call.headers.get("eta")
        if not eta:
            return 0.0
        try:  # a naive value is UTC, as Celery reads it
            return max(0.0, (aware_time(eta) - self.app.now()).total_seconds())
        except (TypeError, ValueError):
            return 0.0


def _signum(value: Any) -> int:
    """The signal number a revoke names (``'SIGKILL'``, ``9``; SIGTERM by default)."""
    try:
        if isinstance(value, str):
            return int(signal.Signals[value if value.startswith("SIG") else "SIG" + value])
        return int(value) if value is not None else int(signal.SIGTERM)
    except (KeyError, TypeError, ValueError):
        return int(signal.SIGTERM)


def _acks_late(app: Celeriac, message: Message, accept: Any) -> bool:
    """Whether the message's task acks late (False when that cannot be told)."""
    try:
        task = app.tasks.get(parse_task_message(message, accept).name)
    except Exception:
        return False
    return task is not None and bool(task._option("acks_late"))


def _exc_meta(value: Any) -> Any:
    from ..protocol import exception_to_dict

    return exception_to_dict(value) if isinstance(value, BaseException) else value


def run_process(app: Celeriac, queues: list[str], hostname: str, housekeeper: bool,
                slots: ActiveSlots | None = None, node: str | None = None) -> None:
    """Entry point of a worker child process: the event loop runs on a thread of its
    own, and ``def`` tasks on this (the main) thread, where signals can interrupt them."""
    task_thread = TaskThread()
    process = WorkerProcess(app, queues, hostname, task_thread, housekeeper, slots, node)

    def exit_now(code: int) -> None:
        logging.shutdown()
        os._exit(code)

    process.exit_now = exit_now
    parent = os.getppid()
    loop_ready = threading.Event()
    failed: list[BaseException] = []

    async def orphaned() -> None:
        """The supervisor died (SIGKILL): shut down warmly instead of running on alone."""
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("the worker's main process is gone; shutting down")
        process.stopping.set()

    async def main() -> None:
        process.loop = asyncio.get_running_loop()
        loop_ready.set()
        watch = process.loop.create_task(orphaned())
        try:
            await process.run()
        finally:
            watch.cancel()

    def run_loop() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failed.append(exc)
        if process.stuck:  # the main thread is held by a task that will not stop
            log.error("worker process %d exits to stop a task that would not stop",
                      os.getpid())
            logging.shutdown()
            os._exit(EXIT_STUCK)
        task_thread.shutdown()

    def on_sigterm(_signum: int, _frame: object) -> None:
        loop_ready.wait()
        process.loop.call_soon_threadsafe(process.stopping.set)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM
    signal.signal(signal.SIGTERM, on_sigterm)
    # on the thread def tasks run on (per-thread set-up such as database connections)
    app.on_after_fork.send(sender=app)
    worker_process_init.send(sender=hostname)
    loop_thread = threading.Thread(target=run_loop, name="celeriac-loop")
    loop_thread.start()
    task_thread.serve()
    loop_thread.join()
    worker_process_shutdown.send(sender=hostname, pid=os.getpid(), exitcode=1 if failed else 0)
    if failed:
        raise failed[0]
