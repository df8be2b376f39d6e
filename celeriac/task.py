"""Tasks: the ``@app.task`` wrapper, its calling API and the request context."""

from __future__ import annotations

import asyncio
import contextvars
import difflib
import inspect
import random
import time
import traceback as tb
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from . import states
from .backends.base import history_entry
from .conf import warn_once
from .exceptions import (
    ExceptionInfo,
    Ignore,
    MaxRetriesExceededError,
    Reject,
    Retry,
    TaskRevokedError,
    TimeLimitExceeded,
)
from .protocol import RequestInfo, aware_time, build_task_message, new_id, origin_name
from .result import AsyncResult, EagerResult
from .signals import task_failure, task_postrun, task_prerun, task_retry, task_success

if TYPE_CHECKING:
    from .app import Celeriac

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Request:
    """What ``self.request`` shows inside a running task."""

    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    hostname: str | None = None
    delivery_info: dict[str, Any] = field(default_factory=dict)
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    origin: str | None = None
    eta: str | None = None
    expires: str | None = None
    timelimit: tuple[float | None, float | None] = (None, None)
    ignore_result: bool = False
    is_eager: bool = False
    called_directly: bool = True
    #: custom headers the producer added (``apply_async(headers=...)``), None without;
    #: each is also readable as an attribute (``self.request.tenant``), as in Celery
    headers: dict[str, Any] | None = None
    #: set by the worker: writes a state through the worker's ordered writer
    state_sink: Callable[[str, str, Any], None] | None = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        headers = self.__dict__.get("headers")
        if headers and name in headers and not name.startswith("_"):
            return headers[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def info(self) -> RequestInfo:
        return RequestInfo(
            id=self.id or "", task=self.task, args=self.args, kwargs=self.kwargs,
            hostname=self.hostname, retries=self.retries, group=self.group,
            parent_id=self.parent_id, delivery_info=self.delivery_info,
            reply_to=self.reply_to,
        )


_current: contextvars.ContextVar[Request | None] = contextvars.ContextVar(
    "celeriac_request", default=None
)


def current_request() -> Request | None:
    """The request of the task running in this context, if any."""
    return _current.get()


@dataclass
class RetryPlan:
    """What ``Task.retry`` asked for, carried to the worker on the :class:`Retry`."""

    retries: int
    eta: datetime | None
    args: tuple[Any, ...] | list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    queue: str | None = None
    priority: int | None = None


@dataclass
class Outcome:
    state: str
    value: Any
    traceback: str | None
    runtime: float


#: Celery task options that are accepted (and carried in messages where Celery puts them)
#: but not acted on by celeriac yet; setting one warns.
NOT_IMPLEMENTED_OPTIONS = frozenset({
    "rate_limit", "throws", "store_errors_even_if_ignored",
    "reject_on_worker_lost", "send_events", "expires", "trail", "base", "shared",
    "pydantic", "lazy",
})


#: ``apply_async`` / ``send_task`` options celeriac implements (beyond its named
#: parameters).
SEND_OPTIONS = frozenset({"headers", "shadow"})
#: Celery's ``apply_async`` / ``send_task`` options (and kombu ``publish`` arguments
#: Celery passes on) that celeriac does not implement, with why; passing one warns once.
UNSUPPORTED_SEND_OPTIONS: dict[str, str] = {
    **dict.fromkeys(("link", "link_error"),
                    "is not supported yet: callbacks and error callbacks are not run"),
    **dict.fromkeys(("exchange", "routing_key", "exchange_type", "declare"),
                    "is not supported: celeriac routes by queue name (use queue=...)"),
    **dict.fromkeys((
        "producer", "connection", "publisher", "router", "result_cls", "add_to_parent",
        "retry", "retry_policy", "compression", "group_id", "group_index", "chord",
        "chain", "parent_id", "root_id", "reply_to", "retries", "route_name", "task_type",
        "replaced_task_nesting", "stamped_headers", "argsrepr", "kwargsrepr", "origin",
        "callbacks", "errbacks", "create_sent_event", "now", "timezone", "delivery_mode",
        "mandatory", "immediate", "content_type", "content_encoding", "expiration",
        "timeout", "confirm_timeout",
    ), "is a Celery option celeriac does not implement"),
}
_SEND_PARAMETERS = ("task_id", "queue", "countdown", "eta", "expires", "priority",
                    "serializer", "ignore_result", "time_limit", "soft_time_limit",
                    *SEND_OPTIONS)


def warn_unsupported_options(options: dict[str, Any]) -> None:
    """Warn, once per name, about each option ``apply_async`` would otherwise drop
    silently: Celery's options celeriac does not implement, and misspelt ones (with
    the nearest right name)."""
    for key in options:
        if key in _SEND_PARAMETERS:  # implemented (apply() gets them as options too)
            continue
        why = UNSUPPORTED_SEND_OPTIONS.get(key)
        if why is not None:
            warn_once(f"send option {key}", f"apply_async option {key!r} {why}; it has no "
                      "effect")
            continue
        near = difflib.get_close_matches(key, [*_SEND_PARAMETERS, *UNSUPPORTED_SEND_OPTIONS],
                                         n=1, cutoff=0.75)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        warn_once(f"send option {key}", f"unknown apply_async option {key!r}{hint}: neither "
                  "celeriac nor Celery has an option of that name; it has no effect")


class Task(Generic[P, R]):
    """A registered task.  Call it to run it here; ``delay`` / ``apply_async`` to queue it."""

    # Options, with Celery's names; None means "use the app's setting".
    ignore_result: bool | None = None
    track_started: bool | None = None
    acks_late: bool | None = None
    serializer: str | None = None
    queue: str | None = None
    priority: int | None = None
    typing: bool = True
    # Time limits in seconds (None: the worker's task_time_limit / task_soft_time_limit).
    time_limit: float | None = None
    soft_time_limit: float | None = None
    # Retries, with Celery's defaults.
    max_retries: int | None = 3
    default_retry_delay: float = 180
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: dict[str, Any] | None = None
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True

    def __init__(self, app: Celeriac, fun: Callable[..., Any], name: str, bind: bool = False,
                 **options: Any) -> None:
        self.app = app
        self.run = fun
        self.name = name
        self.bind = bind
        self.is_async = inspect.iscoroutinefunction(fun)
        for key, value in options.items():
            if key in NOT_IMPLEMENTED_OPTIONS:
                warnings.warn(f"task option {key!r} of task {name} is a Celery option "
                              "celeriac does not implement; it has no effect",
                              UserWarning, stacklevel=3)
            elif not hasattr(type(self), key):
                raise TypeError(f"unknown task option {key!r} for task {name}")
            setattr(self, key, value)
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", name)
        self.__module__ = getattr(fun, "__module__", "")
        self.__wrapped__ = fun

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or '__main__'}>"

    # ------------------------------------------------------------------ running here

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.bind:
            return self.run(self, *args, **kwargs)  # type: ignore[no-any-return]
        return self.run(*args, **kwargs)  # type: ignore[no-any-return]

    @property
    def request(self) -> Request:
        return _current.get() or Request(task=self.name)

    @property
    def backend(self) -> Any:
        return self.app.backend

    def _option(self, name: str) -> Any:
        value = getattr(self, name)
        return getattr(self.app.conf, f"task_{name}") if value is None else value

    # ------------------------------------------------------------------ queueing

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Queue the task with these arguments; shortcut for ``apply_async(args, kwargs)``."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        queue: str | None = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | datetime | None = None,
        priority: int | None = None,
        serializer: str | None = None,
        ignore_result: bool | None = None,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        **options: Any,
    ) -> AsyncResult[R]:
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, task_id=task_id, **options)
        return self.app.send_task(
            self.name, args, kwargs, task_id=task_id,
            queue=queue or self.queue, countdown=countdown, eta=eta, expires=expires,
            priority=self.priority if priority is None else priority,
            serializer=serializer or self.serializer,
            ignore_result=self._option("ignore_result") if ignore_result is None
            else ignore_result,
            time_limit=time_limit or self.time_limit,
            soft_time_limit=soft_time_limit or self.soft_time_limit,
            **options,
        )

    def AsyncResult(self, task_id: str) -> AsyncResult[R]:  # noqa: N802 - Celery's name
        return AsyncResult(task_id, app=self.app, task_name=self.name)

    def apply(self, args: tuple[Any, ...] | list[Any] | None = None,
              kwargs: dict[str, Any] | None = None, *, task_id: str | None = None,
              headers: dict[str, Any] | None = None, **options: Any) -> EagerResult[R]:
        """Run the task here and now; the outcome is kept in the returned result only."""
        if options:
            warn_unsupported_options(options)
        task_id = task_id or new_id()
        history = [history_entry(states.PENDING, hostname=origin_name())]

        def sink(tid: str, state: str, meta: Any) -> None:
            history.append(history_entry(state, meta))

        request = Request(
            id=task_id, task=self.name, args=list(args or ()), kwargs=dict(kwargs or {}),
            root_id=task_id, is_eager=True, called_directly=False, hostname=origin_name(),
            state_sink=sink, headers=dict(headers) if headers else None,
        )
        from .protocol import exception_to_dict, result_meta, stored_form

        history.append(history_entry(states.STARTED))
        outcome = execute_sync(self, request)
        while outcome.state == states.RETRY:  # eager: the next attempt runs at once
            plan = outcome.value.plan
            history.append(history_entry(states.RETRY,
                                         exception_to_dict(outcome.value.reason())))
            request = replace(
                request, retries=plan.retries,
                args=list(request.args if plan.args is None else plan.args),
                kwargs=dict(request.kwargs if plan.kwargs is None else plan.kwargs))
            history.append(history_entry(states.STARTED))
            outcome = execute_sync(self, request)

        value = outcome.value
        stored = stored_form(value)
        meta = result_meta(task_id, outcome.state, stored, traceback=outcome.traceback,
                           date_done=self.app.now().isoformat())
        history.append(history_entry(outcome.state,
                                     stored if outcome.state != states.SUCCESS else None))
        if isinstance(value, BaseException) and self.app.conf.task_eager_propagates:
            raise value
        return EagerResult(task_id, meta, history, app=self.app)

    # ------------------------------------------------------------------ inside a task

    def retry(self, args: tuple[Any, ...] | list[Any] | None = None,
              kwargs: dict[str, Any] | None = None, exc: BaseException | None = None,
              throw: bool = True, eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Any) -> Retry:
        """Run this task again later, with the same id: Celery's ``Task.retry``.

        ``request.retries`` is one more in the next attempt; once it would pass
        ``max_retries`` (the task's, 3 by default; None: no limit) ``exc`` is raised, or
        :class:`MaxRetriesExceededError` when there is none.  Without ``eta`` or
        ``countdown`` the next attempt waits ``default_retry_delay`` (180 s).  The worker
        stores RETRY with ``exc`` and then queues the next attempt.  Raises the
        :class:`Retry` it returns unless ``throw=False``.
        """
        request = self.request
        if request.called_directly:
            # not run by a worker: there is nothing to send again
            raise exc if exc is not None else Retry("Task can be retried", None)
        retries = request.retries + 1
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and retries > limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}] args:{request.args} "
                f"kwargs:{request.kwargs}")
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        when = eta_from(countdown, eta, self.app.now())
        ret = Retry(exc=exc, when=when)
        ret.plan = RetryPlan(retries, when, args, kwargs, options.get("queue"),
                             options.get("priority"))
        if throw:
            raise ret
        return ret

    def _autoretry(self, exc: Exception) -> None:
        """``autoretry_for``: turn ``exc`` into a retry (raises), unless it is excluded."""
        if not isinstance(exc, self.autoretry_for) or isinstance(exc, self.dont_autoretry_for):
            return
        if isinstance(exc, Retry | Ignore | Reject):
            return
        options = dict(self.retry_kwargs or {})
        if self.retry_backoff:
            options["countdown"] = backoff_interval(
                int(self.retry_backoff), self.request.retries, self.retry_backoff_max,
                self.retry_jitter)
        self.retry(exc=exc, **options)

    def update_state(self, task_id: str | None = None, state: str | None = None,
                     meta: Any = None, **_: Any) -> None:
        """Store ``state`` (any string; custom states are fine) with ``meta`` for a task.

        Inside a worker the write goes through the worker's ordered writer, so it can
        never be overtaken by the task's own STARTED or final state.  A task function
        called directly (``add(2, 3)``) has no id: without ``task_id`` nothing is stored.
        """
        if not state:
            raise ValueError("update_state() needs a state, e.g. state='PROGRESS'")
        request = _current.get()
        task_id = task_id or (request.id if request else None)
        if task_id is None:
            return
        if request is not None and request.state_sink is not None:
            request.state_sink(task_id, state, meta)
        else:
            self.backend.store(task_id, state, meta, entry_meta=meta)


def _bound_args(task: Task[Any, Any], request: Request) -> list[Any]:
    return [task, *request.args] if task.bind else list(request.args)


def _failure(exc: BaseException, started: float) -> Outcome:
    # the first frame is celeriac's own call of the task: the user's frames start after it
    trace = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    text = "".join(tb.format_exception(type(exc), exc, trace))
    return Outcome(states.FAILURE, exc, text, time.perf_counter() - started)


def _ended(task: Task[Any, Any], exc: BaseException, started: float) -> Outcome:
    """The outcome of a task that raised (called in the task's context): an error
    listed in ``autoretry_for`` becomes a retry first; then RETRY, IGNORED and REJECTED
    for Celery's control exceptions, FAILURE for anything else (SystemExit and
    KeyboardInterrupt too)."""
    if task.autoretry_for and isinstance(exc, Exception):
        try:
            task._autoretry(exc)
        except BaseException as raised:  # the Retry, or exc itself when retries ran out
            exc = raised
    if isinstance(exc, Retry) and exc.plan is not None:
        outcome = _failure(exc, started)
        outcome.state = states.RETRY
        return outcome
    if isinstance(exc, Ignore):
        return Outcome(states.IGNORED, exc, None, time.perf_counter() - started)
    if isinstance(exc, Reject):
        return Outcome(states.REJECTED, exc, None, time.perf_counter() - started)
    return _failure(exc, started)


def _prerun(task: Task[Any, Any], request: Request) -> None:
    if task_prerun.receivers:
        task_prerun.send(sender=task, task_id=request.id, task=task, args=request.args,
                         kwargs=request.kwargs)


def _ran(task: Task[Any, Any], request: Request, outcome: Outcome) -> Outcome:
    """Celery's signals for how a run ended, sent where the task ran (its thread, its
    context), in Celery's order: task_success, task_failure or task_retry, then
    task_postrun.  A run the worker stopped (hard time limit, terminate) gets its
    signals from the worker instead, as only the worker knows how it ended."""
    if not (task_success.receivers or task_failure.receivers or task_retry.receivers
            or task_postrun.receivers):
        return outcome
    state, value = outcome.state, outcome.value
    if isinstance(value, TimeLimitExceeded | TaskRevokedError):
        return outcome
    if state == states.SUCCESS:
        if task_success.receivers:
            task_success.send(sender=task, result=value, runtime=outcome.runtime)
    elif state == states.FAILURE:
        if task_failure.receivers:
            task_failure.send(sender=task, task_id=request.id, exception=value,
                              args=request.args, kwargs=request.kwargs,
                              traceback=value.__traceback__,
                              einfo=ExceptionInfo(value, outcome.traceback))
    elif state == states.RETRY and task_retry.receivers:
        task_retry.send(sender=task, request=request, reason=value,
                        einfo=ExceptionInfo(value, outcome.traceback))
    if task_postrun.receivers:
        task_postrun.send(sender=task, task_id=request.id, task=task, args=request.args,
                          kwargs=request.kwargs, retval=value, state=state)
    return outcome


def execute_sync(task: Task[Any, Any], request: Request) -> Outcome:
    """Run a task (sync or async) in this thread with ``request`` as its context."""
    token = _current.set(request)
    started = time.perf_counter()
    try:
        _prerun(task, request)
        value = task.run(*_bound_args(task, request), **request.kwargs)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        outcome = Outcome(states.SUCCESS, value, None, time.perf_counter() - started)
    except BaseException as exc:
        outcome = _ended(task, exc, started)
    try:
        return _ran(task, request, outcome)
    finally:
        _current.reset(token)


async def _await(value: Any) -> Any:
    return await value


async def execute_async(
    task: Task[Any, Any], request: Request,
    wrap: Callable[[Coroutine[Any, Any, Any]], Awaitable[Any]] | None = None,
) -> Outcome:
    """Run an ``async def`` task on the running loop (the caller set the context);
    ``wrap`` is what the task's coroutine is awaited through (time limits)."""
    started = time.perf_counter()
    try:
        _prerun(task, request)
        coro = task.run(*_bound_args(task, request), **request.kwargs)
        value = await (coro if wrap is None else wrap(coro))
        outcome = Outcome(states.SUCCESS, value, None, time.perf_counter() - started)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        outcome = _ended(task, exc, started)
    return _ran(task, request, outcome)


def backoff_interval(factor: int, retries: int, maximum: float, jitter: bool) -> int:
    """Celery's exponential backoff: ``factor * 2**retries`` seconds, at most
    ``maximum``, with full jitter a whole number of seconds from 0 to that."""
    countdown = int(min(maximum, factor * (2 ** retries)))
    if jitter:
        countdown = random.randrange(countdown + 1)
    return max(0, countdown)


def eta_from(countdown: float | None, eta: datetime | None, now: datetime) -> datetime | None:
    if countdown is not None:
        return now + timedelta(seconds=countdown)
    return None if eta is None else aware_time(eta)


def expires_from(expires: float | datetime | None, now: datetime) -> datetime | None:
    if expires is None:
        return None
    if isinstance(expires, int | float):
        return now + timedelta(seconds=expires)
    return aware_time(expires)


__all__ = ["Request", "Task", "build_task_message", "current_request"]
