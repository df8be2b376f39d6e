"""Worker heartbeats: how the early-acked tasks of a lost worker host get failed.

A task acked when it starts (the default, ``acks_late`` off) is delivered by no broker
again, so when its worker dies someone must store its end.  A worker process that dies
is handled by its supervisor (see ``ActiveSlots``); a whole host that dies, or a
supervisor killed with its processes, is handled here, through the result store:

* every worker node (one supervisor and its processes) has a unique id
  (:func:`node_id`), and its supervisor writes a heartbeat every ``interval`` seconds;
* its processes keep the node's *roster*, the early-acked tasks they are running, in
  the same writes as those tasks' states (a task enters it with its first entry and
  leaves it with its last, so no window goes uncovered);
* at every beat the supervisor also looks for nodes whose heartbeat is older than
  ``LOST_AFTER_BEATS`` intervals, claims each atomically (only one peer wins; a claimant
  that dies mid-way lets another claim it later), stores FAILURE (WorkerLostError) for
  every task its roster holds, and removes it.  Tasks that stored their end already keep
  it: ready states are final.

The claimant also has the broker put back the messages the lost node held unacked
(its ``acks_late`` tasks and what it had prefetched), where the broker keeps them until
a timeout otherwise (Redis: see ``GivesBackLostNodes``); RabbitMQ redelivers them when
the connection drops, and SQLite's leases lapse after ``visibility_timeout`` (30 s).

So with the default 2 s interval, a lost host's running tasks become FAILURE within
about 12 s (10 s without a heartbeat, plus up to one interval until a peer looks), as
long as some worker using the same result store is up, or as soon as one starts.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .. import states
from ..backends.base import Roster
from ..brokers.base import GivesBackLostNodes
from ..exceptions import WorkerLostError
from ..protocol import exception_to_dict

if TYPE_CHECKING:
    from ..app import Celeriac

log = logging.getLogger("celeriac.worker")

#: Seconds between heartbeats (the worker's ``--heartbeat-interval``, as Celery's).
DEFAULT_INTERVAL = 2.0
#: A node whose last heartbeat is this many intervals old is lost.
LOST_AFTER_BEATS = 5

_UNSAFE = re.compile(r"[^A-Za-z0-9._:@+=-]")


def node_id(hostname: str) -> str:
    """A worker node's id: its host name, its supervisor's pid and 6 random hex digits
    (two workers may share a node name), safe as a file name and a key."""
    return f"{_UNSAFE.sub('_', hostname)[:200]}:{os.getpid()}:{os.urandom(3).hex()}"


def store_lost(app: Celeriac, tasks: Sequence[tuple[str, str]], error: WorkerLostError,
               hostname: str, entry_meta: dict[str, Any], roster: Roster | None) -> bool:
    """Store FAILURE ``error`` for ``tasks`` (``(id, name)``; a task that stored its end
    already keeps it), with ``roster`` (taking them out of a node's roster).  False
    when the store could not be written."""
    backend = app.backend
    try:
        records = [backend.prepare_record(task_id, states.FAILURE, error, hostname=hostname,
                                          entry_meta={**exception_to_dict(error), **entry_meta})
                   for task_id, _ in tasks]
        written = backend.record(records) if roster is None else backend.record(records, roster)
    except Exception as exc:
        log.error("could not store %r for %d tasks: %r", error, len(tasks), exc)
        return False
    for (task_id, name), done in zip(tasks, written, strict=True):
        if done:
            log.error("Task %s[%s] raised unexpected: %r", name, task_id, error)
    return True


class Heart:
    """A supervisor's heartbeat, and its watch over the other nodes'."""

    def __init__(self, app: Celeriac, node: str, hostname: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.app = app
        self.node = node
        self.hostname = hostname
        self.interval = interval
        self.lost_after = interval * LOST_AFTER_BEATS
        self._failing = False

    def register(self, stopping: Callable[[], bool]) -> bool:
        """Write this node's first heartbeat, trying until the store takes it (or
        ``stopping()``; then False).  No process may note a task in the node's roster
        before: a roster whose node has no heartbeat would never be found lost."""
        pause = 0.25
        while True:
            try:
                self.app.backend.heartbeat(self.node, time.time())
                return True
            except Exception as exc:
                log.error("writing this worker's first heartbeat failed: %r; retrying in "
                          "%.1fs (no task is taken before it is written)", exc, pause)
            if stopping():
                return False
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def beat(self) -> None:
        """Write this node's heartbeat, then fail the tasks of any lost node."""
        backend = self.app.backend
        now = time.time()
        try:
            backend.heartbeat(self.node, now)
            stale = backend.stale_nodes(now - self.lost_after)
        except Exception as exc:
            if not self._failing:
                log.warning("writing the worker heartbeat failed: %r (retried every %ss)",
                            exc, self.interval)
            self._failing = True
            return
        if self._failing:
            log.warning("worker heartbeat written again")
            self._failing = False
        for node, seen in stale.items():
            if node != self.node:
                self._take_over(node, seen, now)

    def _take_over(self, node: str, seen: float, now: float) -> None:
        backend = self.app.backend
        try:
            task_ids = backend.claim_node(node, now - self.lost_after, now)
        except Exception as exc:
            log.warning("could not claim lost worker %s: %r", node, exc)
            return
        if task_ids is None:
            return  # it beat again, or another worker took it over
        silent = now - seen
        log.error("worker %s sent no heartbeat for %.1fs: its host is presumed lost; "
                  "failing the %d tasks it was running", node, silent, len(task_ids))
        if task_ids:
            error = WorkerLostError(f"Worker {node} sent no heartbeat for {silent:.1f}s "
                                    "(its host is presumed lost).")
            if not store_lost(self.app, [(t, "") for t in task_ids], error, self.hostname,
                              {"lost_node": node}, None):
                return  # the claim lapses: this or another worker tries again later
        if not self.give_back(node):
            return  # likewise
        try:
            backend.forget_node(node)
        except Exception as exc:  # claimed: another worker takes it over again later
            log.warning("could not remove lost worker %s: %r", node, exc)

    def give_back(self, node: str) -> bool:
        """Put the messages a lost node (or a dead process of this one, ``<node>/<pid>``)
        held unacked (its ``acks_late`` tasks, its prefetched ones) back on their queues
        now, where the broker knows which they are; False when the broker could not be
        reached."""
        broker = self.app.broker
        if not isinstance(broker, GivesBackLostNodes):
            return True  # it redelivers by itself (RabbitMQ) or its leases lapse (SQLite)
        try:
            count = broker.give_back_node(node)
        except Exception as exc:
            log.warning("could not give back the messages of worker %s: %r", node, exc)
            return False
        if count:
            log.warning("gave back %d messages that worker %s held", count, node)
        return True

    def stop(self) -> None:
        """The node stops cleanly: its heartbeat and roster go."""
        try:
            self.app.backend.forget_node(self.node)
        except Exception as exc:
            log.warning("could not remove this worker's heartbeat: %r", exc)
