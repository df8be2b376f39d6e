"""Results: a run's end (SUCCESS, FAILURE, REVOKED) is logged as Celery logs it and
stored, unless it ignores its result; a result that cannot be encoded is stored as
FAILURE with an ``EncodeError`` naming the task."""

from __future__ import annotations

import logging

from ... import states
from ...exceptions import EncodeError
from ...protocol import saferepr, stored_form
from ..pipeline import Hook, TaskRun

log = logging.getLogger("celeriac.worker")


class Results(Hook):
    async def settled(self, run: TaskRun) -> None:
        outcome = run.outcome
        if outcome is None or outcome.state == states.RETRY:  # skipped; retried (its own)
            return
        call = run.call
        if outcome.state == states.SUCCESS:
            if log.isEnabledFor(logging.INFO):
                log.info("Task %s[%s] succeeded in %.6fs: %s", call.name, call.id,
                         outcome.runtime, saferepr(outcome.value))
        elif outcome.state == states.FAILURE:
            log.error("Task %s[%s] raised unexpected: %r\n%s", call.name, call.id,
                      outcome.value, outcome.traceback)
        elif outcome.state == states.IGNORED:
            log.info("Task %s[%s] ignored", call.name, call.id)
            return
        if run.ignore:
            return
        process = self.process
        backend = process.app.backend
        try:
            record = backend.prepare_record(
                call.id, outcome.state, outcome.value, traceback=outcome.traceback,
                request=run.request.info(), hostname=process.hostname,
                entry_meta=None if outcome.state == states.SUCCESS else stored_form(
                    outcome.value),
            )
        except EncodeError as exc:
            error = EncodeError(f"result of task {call.name} cannot be stored: {exc}")
            log.error("Task %s[%s] %s", call.name, call.id, error)
            record = backend.prepare_record(
                call.id, states.FAILURE, error, traceback=None, request=run.request.info(),
                hostname=process.hostname, entry_meta=stored_form(error),
            )
        process.writer.record(record)
