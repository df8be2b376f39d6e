"""The policies of a task's life, one module each (see ``worker/pipeline.py``).

A hook implements only the pipeline points it needs.  Their order in
:func:`standard_hooks` is the order in which they are called at each point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .acks import Acks
from .dedupe import Dedupe
from .eta import Eta
from .history import History
from .results import Results
from .retries import Retries
from .revocation import Revocation
from .signals import Signals
from .time_limits import TimeLimits
from .worker_loss import WorkerLoss

if TYPE_CHECKING:
    from ..pipeline import Hook
    from ..process import WorkerProcess

__all__ = ["Acks", "Dedupe", "Eta", "History", "Results", "Retries", "Revocation",
           "Signals", "TimeLimits", "WorkerLoss", "standard_hooks"]


def standard_hooks(process: WorkerProcess) -> list[Hook]:
    """A worker process's hooks, in the order each point calls them."""
    return [
        process.revocation,  # discard: revoked, expired
        Signals(process),    # received: task_received; task_rejected, task_unknown
        Dedupe(process),     # admit: redelivered and succeeded already -> skip
        Eta(process),        # admit: not due -> wait (discard checked again) or park
        History(process),    # started: RECEIVED, STARTED
        Results(process),    # settled: the end record
        Retries(process),    # finished: RETRY, the next attempt
        Acks(process),       # admit: delivery lost; started: early ack; finished: Reject;
                             # settled: ack or dead letter
        WorkerLoss(process), # reserve: a slot; started: the roster; settled: release
    ]
