"""Acks: when a task's message is acked, and what ``raise Reject`` does with it.

Acks follow Celery: by default the message is acked when the task starts; with
``acks_late`` once its writes are done.  A message that never started (discarded,
skipped) is acked when it is settled.
"""

from __future__ import annotations

import contextlib
import logging

from ... import states
from ...exceptions import Reject
from ...task import Outcome
from ..pipeline import Hook, TaskRun, Verdict

log = logging.getLogger("celeriac.worker")


class Acks(Hook):
    async def admit(self, run: TaskRun) -> Verdict | None:
        if not run.acks_late and not self.process.consumer.holds(run.message):
            # taken before its connection dropped, its ack can no longer reach the
            # broker: started now, it would run again when the broker redelivers it
            log.warning("Task %s[%s] not started: its delivery was lost with the "
                        "connection; the broker delivers it again", run.call.name,
                        run.call.id)
            return Verdict.LEAVE
        return None

    def started(self, run: TaskRun) -> None:
        if not run.acks_late:
            # No broker will deliver it again: if this process dies, the supervisor fails
            # it (its slot); if the whole host is lost, a peer does (the node's roster).
            self.process.writer.ack(run.message, early=True)

    async def finished(self, run: TaskRun) -> Verdict | None:
        """``raise Reject(reason, requeue=...)``.  With ``acks_late`` and ``requeue`` the
        message goes back on its queue and nothing is stored; otherwise the task is
        FAILURE with the Reject (as Celery 5.7 stores it), and an ``acks_late`` message
        is set aside in the dead letters with the reason."""
        outcome = run.outcome
        if outcome is None or outcome.state != states.REJECTED:
            return None
        reject: Reject = outcome.value
        call = run.call
        if reject.requeue and run.acks_late:
            log.info("Task %s[%s] rejected: back on its queue (%r)", call.name, call.id,
                     reject.reason)
            # this attempt's history first, so the next one's entries come after it
            with contextlib.suppress(Exception):
                await self.process.writer.written()
            await self.process.consumer.reject(run.message, requeue=True,
                                               reason="rejected by the task")
            return Verdict.LEAVE
        if reject.requeue:
            log.warning("Task %s[%s] rejected with requeue=True, but its message was acked "
                        "when it started (acks_late is off): stored as FAILURE", call.name,
                        call.id)
        run.outcome = Outcome(states.FAILURE, reject, None, outcome.runtime)
        if run.acks_late:
            run.dead_letter = f"rejected by the task: {reject.reason!r}"
        return None

    async def settled(self, run: TaskRun) -> None:
        if run.dead_letter is not None:
            with contextlib.suppress(Exception):  # its FAILURE first
                await self.process.writer.written()
            await self.process.consumer.reject(run.message, requeue=False,
                                               reason=run.dead_letter)
        elif run.acks_late or not run.started:
            self.process.writer.ack(run.message)
