"""The task pipeline: the fixed points a task's run passes, and the hooks at each.

A worker process hands each message it fetches to :meth:`Pipeline.handle`.  A message
that cannot run (it does not decode, or names no registered task) is set aside; any
other becomes a :class:`TaskRun` that passes these points, in this order:

``discard``
    Whether the task is not to run at all (revoked, expired).  Checked on arrival, and
    again after every wait: an ETA's, and a ``def`` task's wait for the task thread and
    a slot.  A discarded run goes straight to ``settled`` with the outcome the hook set.
``received``
    The message is taken for running here (Celery's ``task_received``).
``admit``
    May skip the run (a redelivered task that succeeded already: settled with no
    outcome), defer it (an ETA: waited for, or parked in the broker) or leave the
    message to the broker (its delivery was lost): :class:`Verdict`.
``reserve``
    What the task needs before it may start, waited for (a worker-loss slot).
``started``
    The run starts: RECEIVED/STARTED records, the early ack, the node's roster.
*execution*
    The task runs under its time limits (:mod:`.hooks.time_limits`); a ``def`` task
    that cannot have the task thread soon is handed back to its queue first.
``finished``
    May replace the outcome (a retry whose next attempt cannot be queued, a ``Reject``)
    or end the run (a ``Reject`` that puts the message back).
``settled``
    The run's last effects are queued: its end record, its ack or dead letter.

Each policy is a :class:`Hook` in a module of its own (``worker/hooks/``) and
implements only the points it needs.  Hooks do no I/O of their own: they queue effects
into the process's one ordered :class:`~celeriac.worker.writer.Writer`.  Which hooks
implement a point is worked out once, when the pipeline is built; a point no hook
implements costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from .. import connection, states
from ..backends.base import Record
from ..brokers.base import DECODE_ERROR
from ..exceptions import DecodeError, NotRegistered, UnsafeTaskId
from ..protocol import (
    Message,
    TaskCall,
    aware_time,
    custom_headers,
    parse_task_message,
    stored_form,
    task_id_of,
)
from ..task import Outcome, Request, Task

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..app import Celeriac
    from .hooks.time_limits import TimeLimits
    from .process import WorkerProcess

log = logging.getLogger("celeriac.worker")


class Verdict(enum.Enum):
    """What a hook decided at ``admit`` or ``finished`` (None: the run goes on)."""

    #: the run ends without (more of) the task: ``settled`` with the run's outcome
    #: (None when nothing is to be stored), and its message acked
    SETTLE = "settle"
    #: the hook dealt with the message itself (parked, handed back, set aside, or left
    #: for the broker to deliver again): nothing more happens to it here
    LEAVE = "leave"


@dataclass(slots=True, eq=False)
class TaskRun:
    """One run of a task in this process, as it passes the pipeline's points."""

    message: Message
    call: TaskCall
    task: Task[Any, Any]
    request: Request
    #: the message is acked after the run's writes (else when it starts)
    acks_late: bool
    #: the run stores nothing (``ignore_result``)
    ignore: bool
    #: the worker-loss slot noting it as running (None: not noted, see hooks.worker_loss)
    slot: int | None = None
    #: how it ended (None until it has, or when it ends storing nothing)
    outcome: Outcome | None = None
    #: it reached ``started`` (its early ack is queued)
    started: bool = False
    #: set aside in the dead letters with this reason once its writes are done, instead
    #: of acked (an ``acks_late`` task that raised Reject)
    dead_letter: str | None = None


class Hook:
    """A policy of a task's life: implements any of the pipeline's points by defining a
    method of that name (the defaults here are never called)."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process

    def malformed(self, message: Message, exc: BaseException) -> None:
        """A message that cannot be decoded was set aside."""

    def unknown(self, message: Message, call: TaskCall) -> None:
        """A message naming a task not registered was set aside."""

    def discard(self, run: TaskRun) -> bool:
        """Whether the task is not to run (set ``run.outcome`` to what is stored)."""
        return False

    def received(self, run: TaskRun) -> None:
        """The message is taken for running here."""

    async def admit(self, run: TaskRun) -> Verdict | None:
        """Skip, defer or leave the run; None lets it go on."""
        return None

    async def reserve(self, run: TaskRun) -> None:
        """Take what the task needs before it starts (may wait)."""

    def started(self, run: TaskRun) -> None:
        """The run starts (queue its records, its early ack)."""

    async def finished(self, run: TaskRun) -> Verdict | None:
        """The task ran: may replace ``run.outcome``, or end the run (LEAVE: nothing is
        settled)."""
        return None

    async def settled(self, run: TaskRun) -> None:
        """Queue the run's last effects."""


def implementing(hooks: list[Hook], point: str) -> list[Callable[..., Any]]:
    """The bound methods of ``hooks`` (in their order) that implement ``point``."""
    default = getattr(Hook, point)
    return [getattr(hook, point) for hook in hooks if getattr(type(hook), point) is not default]


def seconds_until(app: Celeriac, stamp: Any) -> float | None:
    """Seconds from now until a message's ``eta`` or ``expires`` header (None when it
    has none or it cannot be read; a naive value is UTC, as Celery reads it)."""
    if not stamp:
        return None
    try:
        return (aware_time(stamp) - app.now()).total_seconds()
    except (TypeError, ValueError):
        return None


class Pipeline:
    """Runs each message of a worker process through the points, calling the hooks."""

    def __init__(self, process: WorkerProcess, hooks: list[Hook],
                 time_limits: TimeLimits) -> None:
        self.process = process
        self.app = process.app
        self.hooks = hooks
        self.time_limits = time_limits
        #: the asyncio tasks handling runs that have started (never cancelled at
        #: shutdown: their message may be acked already)
        self.started: dict[asyncio.Task[Any], TaskRun] = {}
        self._malformed = implementing(hooks, "malformed")
        self._unknown = implementing(hooks, "unknown")
        self._discard = implementing(hooks, "discard")
        self._received = implementing(hooks, "received")
        self._admit = implementing(hooks, "admit")
        self._reserve = implementing(hooks, "reserve")
        self._started = implementing(hooks, "started")
        self._finished = implementing(hooks, "finished")
        self._settled = implementing(hooks, "settled")

    # ------------------------------------------------------------------ one message

    async def handle(self, message: Message) -> None:
        """Run one message through the pipeline; a lost connection hands it back, and
        anything unforeseen sets it aside: never left held."""
        process = self.process
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if connection.lost(exc):
                # the broker or store went away: never the task's fault.  The message goes
                # back to its queue once the broker answers (unless it was acked when its
                # task started: that task's outcome is queued in the writer already).
                run = self.started.get(asyncio.current_task())  # type: ignore[arg-type]
                if run is not None and not run.acks_late:
                    log.warning("lost the connection after task %s started (%r); its "
                                "outcome is written once the server is back",
                                task_id_of(message), exc)
                    return
                log.warning("lost the connection handling task %s (%r); it goes back to "
                            "its queue", task_id_of(message), exc)
                with contextlib.suppress(Exception):  # stopping: the broker redelivers it
                    await connection.until_connected(
                        partial(process.consumer.reject, message, requeue=True,
                                reason="connection lost"),
                        f"handing task {task_id_of(message)} back", process.stopping)
                return
            # a bug or a message we did not foresee: never leave it held
            log.exception("Unexpected error handling a message; setting it aside")
            with contextlib.suppress(Exception):
                await self.set_aside(message, f"unexpected error: {exc!r}", exc)

    async def _handle(self, message: Message) -> None:
        try:
            if DECODE_ERROR in message.properties:  # the consumer could not decode it
                raise DecodeError(message.properties[DECODE_ERROR])
            call = parse_task_message(message, self.process.accept)
        except (DecodeError, UnsafeTaskId) as exc:
            await self.set_aside(message, f"malformed message: {exc}", exc)
            for malformed in self._malformed:
                malformed(message, exc)
            return
        task = self.app.tasks.get(call.name)
        if task is None:
            log.error("Received unregistered task of type %r. The message has been set aside.",
                      call.name)
            await self.set_aside(message, f"unregistered task {call.name!r}",
                                 NotRegistered(call.name), task_id=call.id)
            for unknown in self._unknown:
                unknown(message, call)
            return
        request = self._request(call, task)
        run = TaskRun(message, call, task, request, acks_late=bool(task._option("acks_late")),
                      ignore=bool(request.ignore_result or task._option("ignore_result")))
        if self.discarded(run):
            await self._settle(run)
            return
        for received in self._received:
            received(run)
        for admit in self._admit:
            verdict = await admit(run)
            if verdict is not None:
                if verdict is Verdict.SETTLE:
                    await self._settle(run)
                return
        if not await self._execute(run):
            return
        for finished in self._finished:
            if await finished(run) is Verdict.LEAVE:
                return
        await self._settle(run)

    def discarded(self, run: TaskRun) -> bool:
        """The ``discard`` point: whether a hook says the task is not to run."""
        return any(discard(run) for discard in self._discard)

    async def _settle(self, run: TaskRun) -> None:
        for settled in self._settled:
            await settled(run)

    async def _execute(self, run: TaskRun) -> bool:
        """Reserve, start and run the task (a ``def`` task on the task thread, which it
        waits for only briefly); False when it did not run."""
        process = self.process
        if run.task.is_async:
            for reserve in self._reserve:
                await reserve(run)
            self._start(run)
            run.outcome = await self.time_limits.execute(run)
            return True
        if not await process.take_task_thread():
            # Busy with a long task: let an idle process have it (it keeps its place).
            await process.consumer.reject(run.message, requeue=True, reason="process busy")
            return False
        try:
            for reserve in self._reserve:
                await reserve(run)
            # revoked (or expired) while it waited for the thread or a slot
            if self.discarded(run):
                await self._settle(run)
                return False
            self._start(run)
            run.outcome = await self.time_limits.execute(run)
            return True
        finally:
            await process.release_task_thread()

    def _start(self, run: TaskRun) -> None:
        me = asyncio.current_task()
        if me is not None:
            self.started[me] = run
            me.add_done_callback(self._ended)
        run.started = True
        for started in self._started:
            started(run)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self.started.pop(task, None)

    async def set_aside(self, message: Message, reason: str, exc: BaseException,
                        task_id: str | None = None) -> None:
        """A message that cannot run: FAILURE is stored when it has an id (and written
        first), then it is dead-lettered with ``reason``."""
        process = self.process
        task_id = task_id or task_id_of(message)
        log.error("Message %s set aside: %s", task_id or "(no usable id)", reason)
        if task_id is not None:
            record = self.app.backend.prepare_record(
                task_id, states.FAILURE, exc, hostname=process.hostname,
                entry_meta=stored_form(exc))
            await self._write(record)
        await connection.until_connected(
            partial(process.consumer.reject, message, requeue=False, reason=reason),
            f"setting message {task_id or '(no usable id)'} aside", process.stopping)

    # ------------------------------------------------------------------ the request

    def _request(self, call: TaskCall, task: Task[Any, Any]) -> Request:
        h = call.headers
        props = call.message.properties
        request = Request(
            id=call.id, task=call.name, args=call.args, kwargs=call.kwargs,
            retries=call.retries, hostname=self.process.hostname,
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

    def _state_sink(self, request: Request) -> Callable[[str, str, Any], None]:
        """Where the task's ``update_state`` goes: from an async task (on the loop) it is
        queued in order; from a ``def`` task it waits until it is written."""
        process = self.process

        def sink(task_id: str, state: str, meta: Any) -> None:
            record = self.app.backend.prepare_record(
                task_id, state, meta, request=request.info(), hostname=process.hostname,
                entry_meta=meta)
            if threading.get_ident() == process.loop_thread:
                process.writer.record(record)  # an async task: ordered, not awaited
            else:
                asyncio.run_coroutine_threadsafe(self._write(record), process.loop).result()

        return sink

    async def _write(self, record: Record) -> None:
        self.process.writer.record(record)
        await self.process.writer.written()

