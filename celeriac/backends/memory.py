"""``memory://`` results: a dict per URL inside one process (tests, eager mode)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import states
from ..control import add_revoked
from ..protocol import check_task_id
from .base import Backend, Record, Roster

if TYPE_CHECKING:
    from ..app import Celeriac


class _Store:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.metas: dict[str, tuple[str, bytes]] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.revoked: dict[str, float] = {}


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


class MemoryBackend(Backend):

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        with _stores_lock:
            self._mem = _stores.setdefault(url, _Store())

    def _get(self, task_id: str) -> bytes | None:
        found = self._mem.metas.get(task_id)
        return None if found is None else found[1]

    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        # no heartbeats here: ``roster`` is not kept (see ``keeps_heartbeats``)
        applied = []
        with self._mem.cond:
            for r in records:
                if r.state is not None:
                    current = self._mem.metas.get(r.task_id)
                    if not states.may_replace(current and current[0], r.state):
                        applied.append(False)
                        continue
                    assert r.payload is not None
                    self._mem.metas[r.task_id] = (r.state, r.payload)
                self._mem.histories.setdefault(r.task_id, []).append(dict(r.entry))
                applied.append(True)
            self._mem.cond.notify_all()
        return applied

    def history(self, task_id: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self._mem.histories.get(task_id, ())]

    def forget(self, task_id: str) -> None:
        check_task_id(task_id)
        with self._mem.cond:
            self._mem.metas.pop(task_id, None)
            self._mem.histories.pop(task_id, None)

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:
        with self._mem.cond:
            add_revoked(self._mem.revoked, task_ids, until)

    def revoked(self) -> dict[str, float]:
        now = time.time()
        with self._mem.cond:
            return {t: u for t, u in self._mem.revoked.items() if u >= now}

    def exists(self, task_id: str) -> bool:
        return task_id in self._mem.metas or task_id in self._mem.histories

    def _wait_for_change(self, task_id: str, timeout: float, attempt: int) -> None:
        with self._mem.cond:
            self._mem.cond.wait(min(timeout, 0.25))
