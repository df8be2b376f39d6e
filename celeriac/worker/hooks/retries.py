"""Retries: ``Task.retry`` stores RETRY (with the exception it was given), and once that
is written queues the next attempt: the same id, ``retries`` one more.  If it cannot be
queued the run ends in FAILURE with the reason."""

from __future__ import annotations

import contextlib
import logging
from functools import partial

from ... import connection, states
from ...exceptions import Retry
from ...protocol import retry_message, stored_form
from ...task import Outcome
from ..pipeline import Hook, TaskRun, Verdict

log = logging.getLogger("celeriac.worker")


class Retries(Hook):
    async def finished(self, run: TaskRun) -> Verdict | None:
        outcome = run.outcome
        if outcome is None or outcome.state != states.RETRY:
            return None
        process, call = self.process, run.call
        retry: Retry = outcome.value
        plan = retry.plan
        shown = retry.reason()
        log.info("Task %s[%s] retry: %s", call.name, call.id, retry)
        if not run.ignore:
            entry = {**stored_form(shown), "retries": plan.retries,
                     "eta": plan.eta.isoformat() if plan.eta else None}
            process.writer.record(process.app.backend.prepare_record(
                call.id, states.RETRY, shown, traceback=outcome.traceback,
                request=run.request.info(), hostname=process.hostname, entry_meta=entry))
            with contextlib.suppress(Exception):  # a refused write was logged already
                await process.writer.written()
        try:
            message = retry_message(call, retries=plan.retries, eta=plan.eta, args=plan.args,
                                    kwargs=plan.kwargs, queue=plan.queue,
                                    priority=plan.priority)
            # a broker that is away is waited for: never a reason for the task to fail
            await connection.until_connected(partial(
                process.loop.run_in_executor, process.io, process.app.publish, message,
                call.args if plan.args is None else plan.args,
                call.kwargs if plan.kwargs is None else plan.kwargs),
                f"queueing the retry of task {call.id}", process.stopping)
        except Exception as exc:
            log.error("Task %s[%s] could not be queued again for its retry: %r", call.name,
                      call.id, exc)
            run.outcome = Outcome(states.FAILURE, exc, None, outcome.runtime)
        return None
