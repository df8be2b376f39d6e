"""History: the RECEIVED entry (and STARTED, with ``track_started``) a run writes as it
starts.  (The end is the results hook's; custom states go through ``update_state``.)"""

from __future__ import annotations

import logging
import os

from ... import states
from ...backends.base import Record, history_entry
from ..pipeline import Hook, TaskRun

log = logging.getLogger("celeriac.worker")


class History(Hook):
    def started(self, run: TaskRun) -> None:
        call, process = run.call, self.process
        if not run.ignore:
            process.writer.record(Record(call.id, history_entry(
                states.RECEIVED, {"retries": call.retries} if call.retries else None,
                hostname=process.hostname)))
        log.info("Task %s[%s] received", call.name, call.id)
        if not run.ignore and run.task._option("track_started"):
            process.writer.record(process.app.backend.prepare_record(
                call.id, states.STARTED, {"pid": os.getpid(), "hostname": process.hostname},
                request=run.request.info(), hostname=process.hostname,
                entry_meta={"pid": os.getpid(), "hostname": process.hostname},
            ))
