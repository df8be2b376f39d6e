"""Worker loss: an early-acked task is recorded as running wherever its loss would be
noticed, from before its ack until its last write has landed.

* its process's slot (``ActiveSlots``, shared with the supervisor): if the process
  dies, the supervisor stores FAILURE for it.  No such task starts unrecorded: it waits
  for a slot when all are taken.
* its worker node's roster (written with the run's records, see ``Writer.running``):
  if the whole host is lost, a peer stores FAILURE for it (``worker/heartbeat.py``).

``acks_late`` tasks need neither: the broker delivers them again.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

from ..pipeline import Hook, TaskRun

if TYPE_CHECKING:
    from ..execution import ActiveSlots
    from ..process import WorkerProcess


class WorkerLoss(Hook):
    def __init__(self, process: WorkerProcess) -> None:
        super().__init__(process)
        #: early-acked tasks running, shown to the supervisor (None: no supervisor)
        self.slots: ActiveSlots | None = process.slots
        self._released = asyncio.Event()  # a slot was given back

    async def reserve(self, run: TaskRun) -> None:
        """A slot noting an early-acked task as running, waiting for one to be released
        if all are taken.  None for acks_late tasks and where no supervisor watches."""
        if run.acks_late or self.slots is None:
            return
        call = run.call
        while (slot := self.slots.take(call.id, call.name)) is None:
            self._released.clear()
            await self._released.wait()
        run.slot = slot

    def started(self, run: TaskRun) -> None:
        if run.acks_late:
            return
        if not run.ignore:
            self.process.writer.running(run.call.id)
        me = asyncio.current_task()
        if me is not None:
            me.add_done_callback(partial(self._ended, run.call.id, run.ignore, run.slot))

    async def settled(self, run: TaskRun) -> None:
        if not run.started:  # reserved, then discarded: it never ran
            self._release(run.slot)

    def _ended(self, task_id: str, ignore: bool, slot: int | None, _: object) -> None:
        """An early-acked task's handling is over: its last write is queued.  It leaves
        the roster with (or after) that write, and its slot once that has landed."""
        if not ignore:
            self.process.writer.ended(task_id)
        if slot is not None:
            self.process.writer.after(partial(self._release, slot))

    def _release(self, slot: int | None) -> None:
        if slot is not None and self.slots is not None:
            self.slots.release(slot)
            self._released.set()
