"""ETA: a task whose ``eta`` has not come is waited for, or kept in the broker when it is
further off (``Consumer.park``), and is checked for a revoke again when it is due."""

from __future__ import annotations

import asyncio
import logging
import time

from ..pipeline import Hook, TaskRun, Verdict, seconds_until

log = logging.getLogger("celeriac.worker")

#: An ETA further off than this (seconds) is kept in the broker until it is due, where
#: the broker can; nearer ones are waited for in the worker.
PARK_AFTER = 1.0


class Eta(Hook):
    async def admit(self, run: TaskRun) -> Verdict | None:
        call, process = run.call, self.process
        while (delay := self._delay(run)) > 0:
            expires_in = seconds_until(process.app, call.headers.get("expires"))
            if expires_in is not None and expires_in < delay:
                # it expires before it is due: it waits until it expires, to be stored
                # REVOKED then rather than at its ETA
                delay = expires_in
            if (delay > PARK_AFTER
                    and await process.consumer.park(run.message, time.time() + delay)):
                log.info("Task %s[%s] is due in %.1fs: kept in the broker until then",
                         call.name, call.id, delay)
                return Verdict.LEAVE
            await asyncio.sleep(delay)
            if process.pipeline.discarded(run):
                return Verdict.SETTLE
        return None

    def _delay(self, run: TaskRun) -> float:
        """Seconds until the message's ``eta`` (0 when it has none or it has passed)."""
        due_in = seconds_until(self.process.app, run.call.headers.get("eta"))
        return 0.0 if due_in is None else max(0.0, due_in)
