"""Running task code so that it can be interrupted: time limits and terminate.

* ``def`` tasks run on the worker process's **main thread** (:class:`TaskThread`),
  because only there can a signal interrupt a blocking call such as ``time.sleep``:
  the event loop sends the main thread SIGUSR1, and the handler raises the pending
  exception (SoftTimeLimitExceeded, TimeLimitExceeded, TaskRevokedError) in the task.
* ``async def`` tasks run on the loop; :class:`Interruptible` drives the task's
  coroutine so that an exception can be thrown into it at the ``await`` it is
  waiting at (asyncio itself only offers CancelledError).
"""

from __future__ import annotations

import asyncio
import mmap
import queue
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Generator
from concurrent.futures import Future
from typing import Any

#: The signal the loop sends the main thread to interrupt the task running there.
INTERRUPT = signal.SIGUSR1


class TaskThread:
    """Runs functions one at a time on the main thread (see :meth:`serve`); any thread
    may :meth:`submit` to it and :meth:`interrupt` what it runs."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], object, Callable[..., Any],
                                            tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._running: object = None  # the key of the job being run
        self._pending: tuple[object, BaseException] | None = None
        self._serving: int | None = None  # the main thread's id, once it serves
        self._lock = threading.Lock()

    def submit(self, key: object, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on the main thread; ``key`` names the job for :meth:`interrupt`."""
        fut: Future[Any] = Future()
        self._jobs.put((fut, key, fn, args))
        return fut

    def interrupt(self, key: object, exc: BaseException) -> None:
        """Raise ``exc`` in the job ``key`` if it is still running (else nothing).  Only
        the main thread can be interrupted: served from another thread (an in-process
        test worker) this does nothing."""
        with self._lock:
            if self._running is not key or self._serving is None:
                return
            self._pending = (key, exc)
        signal.pthread_kill(self._serving, INTERRUPT)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None or pending[0] is not self._running:
                return
        raise pending[1]

    def serve(self) -> None:
        """Run submitted jobs until :meth:`shutdown`, on the calling thread (the main
        thread, for jobs to be interruptible)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(INTERRUPT, self._on_signal)
            self._serving = threading.get_ident()
        while (job := self._jobs.get()) is not None:
            fut, key, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                try:
                    with self._lock:
                        self._running = key
                    result = fn(*args)
                finally:
                    with self._lock:
                        self._running = None
            except BaseException as exc:  # an interrupt landing as the job returned
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def shutdown(self) -> None:
        self._jobs.put(None)


class Interruptible:
    """Awaits a coroutine inside an asyncio task, and can :meth:`throw` an exception into
    it where it waits: the task is woken by a cancel, which is turned into the exception
    (and the cancel request withdrawn) before it reaches the coroutine."""

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._pending: BaseException | None = None

    def throw(self, exc: BaseException) -> None:
        if self._task is not None and not self._task.done():
            self._pending = exc
            self._task.cancel()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Awaitable[Any]:
        """``await interruptible.run(coro)``: await ``coro`` so that it can be interrupted."""
        return _Driven(self, coro)


class _Driven:
    def __init__(self, owner: Interruptible, coro: Coroutine[Any, Any, Any]) -> None:
        self.owner, self.coro = owner, coro

    def __await__(self) -> Generator[Any, Any, Any]:
        owner, coro = self.owner, self.coro
        owner._task = asyncio.current_task()
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                waited = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as done:
                return done.value
            try:
                value, error = (yield waited), None
            except asyncio.CancelledError as exc:
                value, error = None, exc
                if owner._pending is not None:
                    error, owner._pending = owner._pending, None
                    if owner._task is not None:
                        owner._task.uncancel()
            except BaseException as exc:
                value, error = None, exc


class ActiveSlots:
    """The early-acked tasks a worker process is running, kept in memory it shares with
    the supervisor: if the process dies, the supervisor reads what it was running and
    stores FAILURE (WorkerLostError) for it, as no broker will deliver those again.

    A slot is SLOT bytes: a flag byte (1: in use), then ``<task id>\\0<task name>``."""

    SLOT = 512

    @classmethod
    def for_prefetch(cls, prefetch: int) -> ActiveSlots:
        """Slots for a process that runs up to ``prefetch`` tasks at once: a slot is
        freed only once its task's last write has landed, so while one write batch is in
        flight as many tasks again may be running; a task that finds none free waits."""
        return cls(2 * (max(1, prefetch) + 1))

    def __init__(self, count: int) -> None:
        self.count = count
        self.memory = mmap.mmap(-1, count * self.SLOT)  # anonymous, shared across fork
        self._free = list(range(count - 1, -1, -1))

    def take(self, task_id: str, name: str) -> int | None:
        """Note a task as running; its slot number (None when all are taken: the task
        must not start until one is released)."""
        if not self._free:
            return None
        i = self._free.pop()
        data = f"{task_id}\0{name}".encode()[: self.SLOT - 2] + b"\0"
        start = i * self.SLOT
        self.memory[start + 1:start + 1 + len(data)] = data
        self.memory[start] = 1  # set last: a reader never sees a half-written slot in use
        return i

    def release(self, i: int) -> None:
        self.memory[i * self.SLOT] = 0
        self._free.append(i)

    def running(self) -> list[tuple[str, str]]:
        """``(task id, name)`` of every slot in use (the supervisor reads these)."""
        found = []
        for i in range(self.count):
            start = i * self.SLOT
            if self.memory[start] == 1:
                raw = self.memory[start + 1:start + self.SLOT].split(b"\0")
                found.append((raw[0].decode(errors="replace"),
                              raw[1].decode(errors="replace")))
        return found

    def close(self) -> None:
        self.memory.close()
