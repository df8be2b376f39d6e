"""``AsyncResult``: a handle on a task's stored state, result and history."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import states
from .backends.base import entry_for_user
from .exceptions import TimeoutError
from .protocol import check_task_id, exception_from_dict

if TYPE_CHECKING:
    from .app import Celeriac

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """The state and outcome of one task, read from the app's result backend.

    Ready metas are cached: once SUCCESS, FAILURE or REVOKED is seen it cannot change.
    """

    def __init__(self, id: str, app: Celeriac | None = None, task_name: str | None = None,
                 backend: Any = None) -> None:
        if app is None:
            from .app import current_app

            app = current_app()
        self.id = check_task_id(id)
        self.app = app
        self.task_name = task_name
        self._backend = backend
        self._cache: dict[str, Any] | None = None

    @property
    def backend(self) -> Any:
        return self._backend or self.app.backend

    @property
    def task_id(self) -> str:
        return self.id

    # ------------------------------------------------------------------ reading

    def _get_task_meta(self) -> dict[str, Any]:
        if self._cache is not None:
            return self._cache
        meta: dict[str, Any] = self.backend.get_meta(self.id)
        if meta.get("status") in states.READY_STATES:
            self._cache = meta
        return meta

    def _decoded(self, meta: dict[str, Any]) -> Any:
        value = meta.get("result")
        if meta.get("status") in states.EXCEPTION_STATES and value is not None:
            return exception_from_dict(value)
        return value

    @property
    def state(self) -> str:
        return str(self._get_task_meta()["status"])

    status = state

    @property
    def result(self) -> Any:
        return self._decoded(self._get_task_meta())

    info = result

    @property
    def traceback(self) -> str | None:
        return self._get_task_meta().get("traceback")

    @property
    def date_done(self) -> datetime | None:
        value = self._get_task_meta().get("date_done")
        return datetime.fromisoformat(value) if isinstance(value, str) else value

    @property
    def children(self) -> list[Any]:
        return list(self._get_task_meta().get("children") or [])

    def _extended(self, key: str) -> Any:
        return self._get_task_meta().get(key)

    name = property(lambda self: self._extended("name"))
    args = property(lambda self: self._extended("args"))
    kwargs = property(lambda self: self._extended("kwargs"))
    worker = property(lambda self: self._extended("worker"))
    retries = property(lambda self: self._extended("retries"))
    queue = property(lambda self: self._extended("queue"))

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    def exists(self) -> bool:
        """True when the id is known: sent through celeriac, or anything stored for it."""
        return bool(self.backend.exists(self.id))

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every recorded transition, oldest first (state, timestamp, hostname, pid, meta)."""
        return [entry_for_user(e) for e in self.backend.history(self.id)]

    # ------------------------------------------------------------------ waiting

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.5, disable_sync_subtasks: bool = True, **_: Any) -> R:
        """Wait for the task to be ready and return its result (or raise its exception).

        ``interval`` is accepted for compatibility; celeriac's backends wake the
        caller as soon as the result is stored instead of sleeping between polls.
        """
        from .task import current_request

        if disable_sync_subtasks and current_request() is not None:
            raise RuntimeError(
                "Never call result.get() within a task! Waiting on another task from a "
                "task can deadlock the worker; pass disable_sync_subtasks=False to allow it."
            )
        if self._cache is None:
            meta = self.backend.wait(self.id, timeout)
            self._cache = meta
        meta = self._cache
        value = self._decoded(meta)
        if meta["status"] in states.PROPAGATE_STATES and propagate:
            raise value
        return value  # type: ignore[no-any-return]

    wait = get

    def forget(self) -> None:
        self._cache = None
        self.backend.forget(self.id)

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str | None = None, wait: bool = False,
               timeout: float | None = None) -> None:
        """Revoke this task (``app.control.revoke``); with ``wait``, block until REVOKED
        (or another ready state) is stored, up to ``timeout`` seconds."""
        self.app.control.revoke(self.id, terminate=terminate, signal=signal or "SIGTERM")
        if wait:
            self.backend.wait(self.id, timeout)

    # ------------------------------------------------------------------ identity

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.id}>"

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return other.id == self.id
        if isinstance(other, str):
            return other == self.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    def as_tuple(self) -> tuple[tuple[str, None], None]:
        return ((self.id, None), None)


class EagerResult(AsyncResult[R]):
    """The outcome of a task run in the calling process (``apply()`` / ``task_always_eager``)."""

    def __init__(self, id: str, meta: dict[str, Any], history: list[dict[str, Any]],
                 app: Celeriac | None = None) -> None:
        super().__init__(id, app=app)
        self._cache = meta
        self._history = history

    def _get_task_meta(self) -> dict[str, Any]:
        assert self._cache is not None
        return self._cache

    @property
    def history(self) -> list[dict[str, Any]]:
        return [entry_for_user(e) for e in self._history]

    def exists(self) -> bool:
        return True

    def forget(self) -> None:
        pass

    def revoke(self, connection: Any = None, terminate: bool = False,
               signal: str | None = None, wait: bool = False,
               timeout: float | None = None) -> None:
        """An eager task has run already: nothing to revoke."""

    def get(self, timeout: float | None = None, propagate: bool = True,
            interval: float = 0.5, disable_sync_subtasks: bool = True, **_: Any) -> R:
        meta = self._get_task_meta()
        value = self._decoded(meta)
        if meta["status"] in states.PROPAGATE_STATES and propagate:
            raise value
        if meta["status"] not in states.READY_STATES:
            raise TimeoutError("The operation timed out.")
        return value  # type: ignore[no-any-return]
