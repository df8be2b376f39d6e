"""Revocation: a revoked or expired task is not run, and ``revoke(terminate=True)``
stops a running one.

The revoked ids themselves are the worker process's (``WorkerProcess.revoked``, filled
from remote-control broadcasts and the store's revoke record); this hook decides what
they mean for a run.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from ... import states
from ...exceptions import TaskRevokedError
from ...signals import task_revoked
from ...task import Outcome
from ..pipeline import Hook, TaskRun, seconds_until

log = logging.getLogger("celeriac.worker")


class Revocation(Hook):
    def discard(self, run: TaskRun) -> bool:
        """A task revoked or expired is not run: its message is acked and REVOKED is
        stored (reason ``revoked`` / ``expired``)."""
        call = run.call
        if self.process._is_revoked(call.id):
            log.info("Discarding revoked task: %s[%s]", call.name, call.id)
            reason = "revoked"
        elif self._expired(run):
            log.info("Task %s[%s] expired: revoked", call.name, call.id)
            reason = "expired"
        else:
            return False
        run.outcome = Outcome(states.REVOKED, TaskRevokedError(reason), None, 0.0)
        if task_revoked.receivers:
            task_revoked.send(sender=run.task, request=run.request, terminated=False,
                              signum=None, expired=reason == "expired")
        return True

    def _expired(self, run: TaskRun) -> bool:
        expires_in = seconds_until(self.process.app, run.call.headers.get("expires"))
        return expires_in is not None and expires_in <= 0

    def terminate(self, task_ids: list[str], signum: int) -> None:
        """``revoke(terminate=True)``: stop those of ``task_ids`` this process runs; each
        ends REVOKED (``terminated``), as at a hard time limit (see hooks.time_limits)."""
        for task_id in task_ids:
            running = self.process.time_limits.running.get(task_id)
            if running is None or running.stop.done():
                continue
            log.warning("Terminating %s[%s] (revoked)", running.call.name, task_id)
            running.stop.set_result(Outcome(
                states.REVOKED, TaskRevokedError("terminated"), None, 0.0))
            if task_revoked.receivers:
                task_revoked.send(sender=running.task, request=running.request,
                                  terminated=True, signum=signum, expired=False)


def signal_number(value: Any) -> int:
    """The signal number a revoke names (``'SIGKILL'``, ``9``; SIGTERM by default)."""
    try:
        if isinstance(value, str):
            return int(signal.Signals[value if value.startswith("SIG") else "SIG" + value])
        return int(value) if value is not None else int(signal.SIGTERM)
    except (KeyError, TypeError, ValueError):
        return int(signal.SIGTERM)
