"""Celery's signals about the messages a worker process takes: ``task_received``,
``task_rejected`` (a message that cannot be decoded) and ``task_unknown`` (a task not
registered), sent by the process (Celery's sender there is its consumer).

The task's own signals are sent where it runs (``task.py``: prerun, success, failure,
retry, postrun); ``task_revoked`` by the revocation hook; the hard time limit's
``task_failure`` by the time-limits step.  Each is sent only ``if signal.receivers``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...signals import task_received, task_rejected, task_unknown
from ..pipeline import Hook, TaskRun

if TYPE_CHECKING:
    from ...protocol import Message, TaskCall


class Signals(Hook):
    def malformed(self, message: Message, exc: BaseException) -> None:
        if task_rejected.receivers:
            task_rejected.send(sender=self.process, message=message, exc=exc)

    def unknown(self, message: Message, call: TaskCall) -> None:
        if task_unknown.receivers:
            # as Celery: the registry's KeyError (NotRegistered is what is stored)
            task_unknown.send(sender=self.process, message=message, exc=KeyError(call.name),
                              name=call.name, id=call.id)

    def received(self, run: TaskRun) -> None:
        if task_received.receivers:
            task_received.send(sender=self.process, request=run.request)
