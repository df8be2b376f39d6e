"""``app.control``: remote control of workers, in Celery's mailbox format.

Only ``revoke`` (and ``terminate``) is built.  A revoke does three things, so that it
holds whichever workers are up:

1. it keeps the ids in the result store's revoke record (``Backend.add_revoked``) for
   REVOKES_EXPIRE seconds (the newest REVOKES_MAX of them): a worker that starts later
   reads it, and never runs them;
2. it broadcasts Celery's ``revoke`` command (``Broker.broadcast``: the ``celery.pidbox``
   fanout on RabbitMQ and Redis), which celeriac and Celery workers both obey;
3. it stores REVOKED at once for the tasks that have not started (nothing ready stored,
   no history entry past being sent or retried); a worker that holds such a message
   later discards it.  A task already running goes on unless ``terminate=True``, which
   stops it on the worker running it, and that worker stores REVOKED.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from . import states
from .exceptions import TaskRevokedError
from .protocol import check_task_id, exception_to_dict, origin_name

if TYPE_CHECKING:
    from .app import Celeriac

log = logging.getLogger("celeriac.control")

#: How long a revoke holds (seconds): Celery workers remember a revoked id three hours
#: (``CELERY_WORKER_REVOKE_EXPIRES`` in the environment, Celery's name, changes it).
REVOKES_EXPIRE = float(os.environ.get("CELERY_WORKER_REVOKE_EXPIRES") or 10800)
#: Most revoked ids kept, in the result store's revoke record and in each worker
#: process's memory; past it the oldest revokes are forgotten first.  Celery's bound
#: (``CELERY_WORKER_REVOKES_MAX`` in the environment, Celery's name, changes it).
REVOKES_MAX = max(1, int(os.environ.get("CELERY_WORKER_REVOKES_MAX") or 50000))
#: REVOKED states written per batch.
CHUNK = 1000


def add_revoked(revoked: dict[str, float], task_ids: Iterable[str], until: float) -> None:
    """Note ``task_ids`` as revoked until ``until`` in ``revoked``, newest last (so the
    bound forgets the oldest), and keep it within REVOKES_MAX."""
    for task_id in task_ids:
        revoked.pop(task_id, None)
        revoked[task_id] = until
    bound_revoked(revoked)


def bound_revoked(revoked: dict[str, float]) -> None:
    """Keep at most REVOKES_MAX revoked ids in ``revoked`` (oldest first in it): past
    that, the oldest tenth of the bound goes at once, so a flood costs one trim per
    REVOKES_MAX // 10 revokes."""
    excess = len(revoked) - REVOKES_MAX
    if excess > 0:
        for task_id in list(itertools.islice(revoked, excess + REVOKES_MAX // 10)):
            del revoked[task_id]


def command(method: str, arguments: dict[str, Any],
            destination: Sequence[str] | None = None) -> dict[str, Any]:
    """A remote-control command as Celery's mailbox sends it."""
    return {"method": method, "arguments": arguments,
            "destination": list(destination) if destination else None,
            "pattern": None, "matcher": None}


class Control:
    def __init__(self, app: Celeriac) -> None:
        self.app = app

    def revoke(self, task_id: str | Sequence[str], destination: Sequence[str] | None = None,
               terminate: bool = False, signal: str = "SIGTERM", **_: Any) -> None:
        """Revoke one task id or several: they will not run; with ``terminate``, one that
        is running is stopped.  ``destination``: only these worker hostnames obey (the
        REVOKED state and the revoke record are written all the same)."""
        ids = [task_id] if isinstance(task_id, str) else list(task_id)
        for tid in ids:
            check_task_id(tid)
        if not ids:
            return
        backend, broker = self.app.backend, self.app.broker
        backend.add_revoked(ids, time.time() + REVOKES_EXPIRE)
        broker.broadcast(command("revoke", {
            "task_id": ids[0] if isinstance(task_id, str) else ids,
            "terminate": terminate, "signal": signal}, destination))
        reason = TaskRevokedError("revoked")
        meta = exception_to_dict(reason)
        host = origin_name()
        waiting = backend.waiting(ids)
        for i in range(0, len(waiting), CHUNK):
            backend.record([backend.prepare_record(t, states.REVOKED, reason, hostname=host,
                                                   entry_meta=meta)
                            for t in waiting[i:i + CHUNK]])
        log.info("revoked %d tasks (%d not started: REVOKED)", len(ids), len(waiting))

    def terminate(self, task_id: str | Sequence[str],
                  destination: Sequence[str] | None = None, signal: str = "SIGTERM",
                  **kwargs: Any) -> None:
        """``revoke(task_id, terminate=True)``."""
        self.revoke(task_id, destination, terminate=True, signal=signal, **kwargs)
