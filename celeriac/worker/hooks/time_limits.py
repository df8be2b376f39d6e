"""Time limits: the pipeline's execution step runs each task under its soft and hard
time limits, and stops a task revoked with ``terminate``.

At the soft limit SoftTimeLimitExceeded is raised in the task, which may catch it.  At
the hard limit, or when terminated, the outcome is decided here (FAILURE
TimeLimitExceeded, or REVOKED) and the task is stopped: an async task is cancelled; a
def task gets TimeLimitExceeded / TaskRevokedError raised in it, and if it has not
stopped STOP_GRACE seconds later the process is replaced, as only that can stop it.
(The interrupting pieces are ``worker/execution.py``.)
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ... import states
from ...exceptions import ExceptionInfo, SoftTimeLimitExceeded, TimeLimitExceeded
from ...signals import task_failure
from ...task import Outcome, Request, Task, _current, execute_async, execute_sync
from ..execution import Interruptible

if TYPE_CHECKING:
    from ...protocol import TaskCall
    from ..pipeline import TaskRun
    from ..process import WorkerProcess

log = logging.getLogger("celeriac.worker")

#: A task stopped at its hard time limit or by revoke(terminate=True) that has not
#: stopped this many seconds later is abandoned: a def task's process is replaced.
STOP_GRACE = 1.0


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


class TimeLimits:
    """The execution step: runs a task (async on the loop, def on the task thread)."""

    def __init__(self, process: WorkerProcess) -> None:
        self.process = process
        self.running: dict[str, Running] = {}  # task id -> the task running it

    async def execute(self, run: TaskRun) -> Outcome:
        call, task, request = run.call, run.task, run.request
        process = self.process
        loop, task_thread = process.loop, process.task_thread
        hard, soft = time_limits(call, task, process.app.conf)
        running = Running(call, task, request)
        self.running[call.id] = running
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
                job = asyncio.wrap_future(task_thread.submit(running, execute_sync, task,
                                                             request))
            running.job = job
            started = loop.time()
            if soft and (not hard or soft < hard):
                await asyncio.wait({job, running.stop}, timeout=soft)
                if not job.done() and not running.stop.done():
                    log.warning("Soft time limit (%ss) exceeded for %s[%s]", soft, call.name,
                                call.id)
                    exc = SoftTimeLimitExceeded(soft)
                    if interruptible is not None:
                        interruptible.throw(exc)
                    else:
                        task_thread.interrupt(running, exc)
            timeout = None if not hard else max(0.0, hard - (loop.time() - started))
            await asyncio.wait({job, running.stop}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if job.done():
                return _outcome_of(job, started, loop.time())
            if running.stop.done():
                outcome = running.stop.result()
            else:
                log.error("Hard time limit (%ss) exceeded for %s[%s]", hard, call.name,
                          call.id)
                error = TimeLimitExceeded(hard)
                outcome = Outcome(states.FAILURE, error, None, loop.time() - started)
                if task_failure.receivers:
                    task_failure.send(sender=task, task_id=call.id, exception=error,
                                      args=request.args, kwargs=request.kwargs,
                                      traceback=None, einfo=ExceptionInfo(error, ""))
            await self._halt(running, outcome.value)
            return outcome
        finally:
            del self.running[call.id]

    async def _halt(self, running: Running, exc: BaseException) -> None:
        """Stop a running task whose outcome is already decided (see :meth:`execute`)."""
        job = running.job
        assert job is not None
        if running.task.is_async:
            job.cancel()
        else:
            self.process.task_thread.interrupt(running, exc)
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
        self.process.stuck = True
        self.process.stopping.set()
