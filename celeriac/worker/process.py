"""One worker process: an event loop that fetches messages from the broker and hands
each to the task pipeline (``worker/pipeline.py``).

* ``async def`` tasks run on the loop; ``def`` tasks run one at a time on a task
  thread, so they never block the loop (or the other tasks' writes).
* Every write of this process — history entries, states, results and acks — goes
  through one :class:`~celeriac.worker.writer.Writer`, which keeps them in order and
  applies whatever has piled up as one batch (one backend transaction, one multi-ack).
* It listens for remote control (``revoke``) and keeps the revoked task ids.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..control import REVOKES_EXPIRE, add_revoked, bound_revoked
from ..serialization import accepted_content_types
from ..signals import worker_process_init, worker_process_shutdown
from .execution import ActiveSlots, TaskThread
from .hooks import Revocation, TimeLimits, standard_hooks
from .hooks.revocation import signal_number
from .pipeline import Pipeline
from .writer import Writer

if TYPE_CHECKING:
    from ..app import Celeriac
    from ..brokers.base import Consumer

log = logging.getLogger("celeriac.worker")

#: A ``def`` task that cannot start within this many seconds (the process's task thread
#: is busy) is handed back to the queue for another process, and this process stops
#: fetching until its thread is free.  Short tasks never wait this long.
HAND_BACK_AFTER = 0.05
#: Longest a starting worker process waits for the revoke record before it takes tasks.
REVOKES_LOAD_WAIT = 10.0
#: Exit status of a worker process that had to exit to stop a task (see STOP_GRACE in
#: hooks/time_limits.py).
EXIT_STUCK = 3
#: Exit status of a worker process whose writer failed (a bug: see the log).
EXIT_WRITER_FAILED = 4


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
        #: a def task would not stop: the process is to be replaced once shut down
        self.stuck = False
        #: revoked task ids -> when the revoke lapses (epoch s): from broadcasts, and
        #: from the result store's revoke record when the control channel (re)connects
        self.revoked: dict[str, float] = {}
        self._revokes_loaded = asyncio.Event()
        self._pruned = 0.0
        self.consumer: Consumer
        self.writer = Writer(self)
        self.stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._sync_slot = asyncio.Semaphore(1)
        self._paused = False  # handed a message back: fetch nothing until the thread is free
        self._background: set[asyncio.Task[None]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        #: exits the process at once (set when it is a worker's own process)
        self.exit_now: Callable[[int], None] | None = None
        self.time_limits = TimeLimits(self)
        self.revocation = Revocation(self)
        self.pipeline = Pipeline(self, standard_hooks(self), self.time_limits)

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.loop_thread = threading.get_ident()
        name = f"{self.hostname}/{os.getpid()}/{os.urandom(3).hex()}"
        self.consumer = self.app.broker.consumer(self.queues, name=name, io=self.io)
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
                    t = loop.create_task(self.pipeline.handle(message))
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
        add_revoked(self.revoked, ids, until)
        log.info("Tasks flagged as revoked: %s", ", ".join(ids))
        if arguments.get("terminate"):
            self.revocation.terminate(ids, signal_number(arguments.get("signal")))
        if time.time() - self._pruned > 60:
            self._pruned = time.time()
            self.revoked = {t: u for t, u in self.revoked.items() if u >= self._pruned}

    def _is_revoked(self, task_id: str) -> bool:
        until = self.revoked.get(task_id)
        return until is not None and until >= time.time()

    def _finished(self, t: asyncio.Task[None]) -> None:
        self._running.discard(t)
        self._slot_free.set()
        self.writer.progress()
        if not t.cancelled() and t.exception() is not None:
            log.error("worker failed handling a message", exc_info=t.exception())

    async def _shutdown(self) -> None:
        """Warm shutdown: started tasks finish, prefetched ones go back to the queue."""
        for t in list(self._running):
            if t not in self.pipeline.started:
                t.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await asyncio.sleep(0)  # the finished tasks' callbacks queue their last writes
        if self._writer_task is not None and not self._writer_task.done():
            await self.writer.flushed()
        await self.consumer.close()
        self.io.shutdown(wait=True)

    # ------------------------------------------------------------------ the task thread

    async def _unpause(self) -> None:
        if self._paused and not self._sync_slot.locked():
            self._paused = False
            await self.consumer.resume()

    async def take_task_thread(self) -> bool:
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
        return bool(self.pipeline.started)

    async def release_task_thread(self) -> None:
        if not self.stuck:  # else the thread never frees up: take nothing more
            self._sync_slot.release()
            await self._unpause()
            self._slot_free.set()


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
