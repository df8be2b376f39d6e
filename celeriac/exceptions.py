"""Exceptions raised by celeriac, named as Celery names them.

Results store an exception as ``{"exc_type", "exc_message", "exc_module"}``.
The classes below are written under the module Celery uses for its class of that
name (``celery.exceptions``; ``billiard.exceptions`` for the time limits and
WorkerLostError), so a Celery client reading a celeriac result resolves them to its
own classes, and celeriac resolves those names back to these classes (protocol.py).
"""

from __future__ import annotations

import builtins
from typing import Any


class CeleriacError(Exception):
    """Base class of celeriac's own errors."""


class ImproperlyConfigured(CeleriacError):
    """A setting has a value celeriac cannot use."""


class TimeoutError(CeleriacError, builtins.TimeoutError):  # noqa: A001 - Celery's name
    """``AsyncResult.get(timeout=...)`` ran out of time."""


class NotRegistered(CeleriacError, KeyError):
    """A message named a task the worker does not know."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class EncodeError(CeleriacError, TypeError):
    """A value could not be serialized."""


class DecodeError(CeleriacError, ValueError):
    """Bytes could not be turned back into a value (malformed message or result)."""


class ContentDisallowed(DecodeError):
    """A message or result used a serializer that is not in ``accept_content``."""


class UnsafeTaskId(CeleriacError, ValueError):
    """A task id cannot be used as a storage key (path separators, control characters...)."""


class BackendStoreError(CeleriacError):
    """The result store refused to keep a task's state for good (too big, a key of the
    wrong type...): stored as the task's FAILURE in its place."""


class SecurityError(CeleriacError):
    """A stored exception named something that is not an exception class."""


class TaskRevokedError(CeleriacError):
    """The task was revoked and did not run (or was stopped)."""


class WorkerLostError(CeleriacError):
    """The process running the task died."""


class SoftTimeLimitExceeded(CeleriacError):
    """Raised inside a task when its soft time limit passes; the task may catch it."""


class TimeLimitExceeded(CeleriacError):
    """The task ran past its hard time limit and was stopped."""

    def __str__(self) -> str:
        return f"TimeLimitExceeded{self.args!r}"


class MaxRetriesExceededError(CeleriacError):
    """``Task.retry`` was called more times than ``max_retries`` allows."""


class Ignore(CeleriacError):  # noqa: N818 - Celery's name
    """Raised by a task to leave its state as it is and store nothing more."""


class Reject(CeleriacError):  # noqa: N818 - Celery's name
    """Raised by a task to reject its message, optionally putting it back on the queue."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)


class Retry(CeleriacError):  # noqa: N818 - Celery's name
    """Raised by ``Task.retry`` to tell the worker the task will run again."""

    def __init__(self, message: str | None = None, exc: BaseException | None = None,
                 when: Any = None) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        self.plan: Any = None  # set by Task.retry: what the worker sends again
        super().__init__(message, exc, when)

    def reason(self) -> BaseException:
        """What is stored with RETRY: the exception given to ``retry``, or this one."""
        return self.exc if self.exc is not None else Retry(str(self))

    def humanize(self) -> str:
        if isinstance(self.when, int | float):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc is not None:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"


#: Celery's module name for most of the classes above, as written into stored results.
CELERY_EXC_MODULE = "celery.exceptions"
#: Where Celery's time-limit and lost-worker exceptions come from.
BILLIARD_EXC_MODULE = "billiard.exceptions"
_FROM_BILLIARD = (WorkerLostError, SoftTimeLimitExceeded, TimeLimitExceeded)

#: The stored ``(exc_module, exc_type)`` of each class above, and back.
STORED_NAME: dict[type[BaseException], tuple[str, str]] = {
    cls: (BILLIARD_EXC_MODULE if cls in _FROM_BILLIARD else CELERY_EXC_MODULE, cls.__name__)
    for cls in (
        TimeoutError, NotRegistered, EncodeError, DecodeError, ContentDisallowed,
        TaskRevokedError, WorkerLostError, SoftTimeLimitExceeded, TimeLimitExceeded,
        MaxRetriesExceededError, Ignore, Reject, Retry, ImproperlyConfigured, SecurityError,
        BackendStoreError,
    )
}
CELERY_NAMED: dict[tuple[str, str], type[BaseException]] = {
    name: cls for cls, name in STORED_NAME.items()}


class ExceptionInfo:
    """An exception with its traceback, as Celery's signals pass it (``einfo``):
    ``exception``, ``type``, ``tb`` (the traceback object) and ``traceback`` (text)."""

    def __init__(self, exception: BaseException, traceback: str | None = None,
                 internal: bool = False) -> None:
        import traceback as tb

        self.exception = exception
        self.type = type(exception)
        self.tb = exception.__traceback__
        self.traceback = traceback if traceback is not None else "".join(
            tb.format_exception(type(exception), exception, exception.__traceback__))
        self.internal = internal

    def __str__(self) -> str:
        return self.traceback

    def __repr__(self) -> str:
        return f"<ExceptionInfo: {self.exception!r}>"
