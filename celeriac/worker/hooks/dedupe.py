"""Dedupe: a message delivered again whose task already stored SUCCESS is acked, not run
(its worker died after writing the result, before acking; Celery's
``worker_deduplicate_successful_tasks``).  Costs one read, for redelivered messages only."""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from ... import connection, states
from ..pipeline import Hook, TaskRun, Verdict

if TYPE_CHECKING:
    from ...protocol import TaskCall

log = logging.getLogger("celeriac.worker")


class Dedupe(Hook):
    async def admit(self, run: TaskRun) -> Verdict | None:
        # delivered again: an acks_late task whose worker was lost, or an early ack lost
        # with its connection
        if run.message.redelivered and await self._succeeded(run.call):
            log.info("Task %s[%s] succeeded already: not run again (delivered again)",
                     run.call.name, run.call.id)
            return Verdict.SETTLE
        return None

    async def _succeeded(self, call: TaskCall) -> bool:
        """Whether SUCCESS is stored for the task."""
        process = self.process
        try:  # a store that is away is waited for (stopping: handed back, see Pipeline)
            stored = await connection.until_connected(
                partial(process.loop.run_in_executor, process.io,
                        process.app.backend.stored_state, call.id),
                f"reading the state of task {call.id}", process.stopping)
        except Exception as exc:
            if connection.lost(exc):
                raise
            log.warning("could not read the state of task %s[%s] (%r); running it",
                        call.name, call.id, exc)
            return False
        return stored == states.SUCCESS
