"""Celery's signals, with Celery's names, senders and keyword arguments.

Connect a receiver as with Celery::

    from celeriac.signals import task_success

    @task_success.connect
    def done(sender=None, result=None, **kwargs): ...

    @task_success.connect(sender='proj.add', dispatch_uid='count-adds')
    def added(sender=None, **kwargs): ...

A receiver must accept ``**kwargs`` (signals gain arguments over time).  Receivers are
called in the order they were connected; one that raises is logged and the others are
still called (the exception is returned in :meth:`Signal.send`'s list, never raised).
Sending a signal nobody listens to is one attribute test.

Where each signal is sent, and with what, is listed in docs/ARCHITECTURE.md (Signals).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar

log = logging.getLogger("celeriac.signals")

F = TypeVar("F", bound=Callable[..., Any])

#: Pauses between attempts of a receiver connected with ``retry=True`` (seconds; the
#: last one repeats): the receiver is called until it returns.
RETRY_PAUSES = (2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0)


def _key(obj: Any) -> Hashable:
    """What identifies a receiver or a sender: strings by value (task names are
    senders), bound methods by instance and function, anything else by identity."""
    if obj is None or isinstance(obj, str | bytes):
        return obj
    if inspect.ismethod(obj):
        return (id(obj.__self__), id(obj.__func__))
    return id(obj)


def _accepts_kwargs(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: give it the benefit
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Signal:
    """A named point where receivers are called (the observer pattern)."""

    def __init__(self, name: str, providing_args: Iterable[str] = ()) -> None:
        self.name = name
        self.providing_args = frozenset(providing_args)
        #: ((receiver key or dispatch_uid, sender key), receiver or a weak reference),
        #: replaced as a whole on every change so send() reads it without a lock
        self.receivers: list[tuple[tuple[Hashable, Hashable], Any]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Signal: {self.name}>"

    def connect(self, receiver: Callable[..., Any] | None = None, *, sender: Any = None,
                weak: bool = True, dispatch_uid: Hashable | None = None,
                retry: bool = False) -> Any:
        """Connect ``receiver``, or used as a decorator (``@signal.connect`` or
        ``@signal.connect(sender=..., weak=..., dispatch_uid=...)``).

        ``sender``: only calls from that sender (None: any).  ``weak``: hold the
        receiver by a weak reference (it goes when nothing else holds it).
        ``dispatch_uid``: a receiver connected again under the same uid (and sender)
        is not added twice.  ``retry``: a receiver that raises is called again, with
        pauses, until it returns (it is then held strongly)."""
        def connect(fn: F) -> F:
            self._connect(fn, sender, weak, dispatch_uid, retry)
            return fn

        if receiver is None:
            return connect
        return connect(receiver)  # type: ignore[arg-type]

    def _connect(self, fn: Callable[..., Any], sender: Any, weak: bool,
                 dispatch_uid: Hashable | None, retry: bool) -> None:
        if not callable(fn):
            raise TypeError(f"a receiver of signal {self.name} must be callable, not {fn!r}")
        if not _accepts_kwargs(fn):
            raise ValueError(f"receiver {fn!r} of signal {self.name} must accept **kwargs")
        key = (dispatch_uid if dispatch_uid is not None else _key(fn), _key(sender))
        held: Any = fn
        if retry:
            held = _retrying(fn)
        elif weak:
            held = weakref.WeakMethod(fn) if inspect.ismethod(fn) else weakref.ref(fn)
        with self._lock:
            # a collected receiver's id may be reused by a new one: drop the dead first
            live = [(k, r) for k, r in self.receivers if not _dead(r)]
            if any(k == key for k, _ in live):
                self.receivers = live
                return
            self.receivers = [*live, (key, held)]

    def disconnect(self, receiver: Callable[..., Any] | None = None, sender: Any = None,
                   dispatch_uid: Hashable | None = None) -> bool:
        """Disconnect a receiver (named by itself or by its ``dispatch_uid``) from
        ``sender``; whether one was connected."""
        key = (dispatch_uid if dispatch_uid is not None else _key(receiver), _key(sender))
        with self._lock:
            kept = [(k, r) for k, r in self.receivers if k != key]
            found = len(kept) != len(self.receivers)
            self.receivers = kept
        return found

    def _live(self, sender: Any) -> list[Callable[..., Any]]:
        wanted = _key(sender)
        live, dead = [], False
        for (_, sender_key), held in self.receivers:
            if sender_key is not None and sender_key != wanted:
                continue
            if isinstance(held, weakref.ref):
                fn = held()
                if fn is None:
                    dead = True
                    continue
                live.append(fn)
            else:
                live.append(held)
        if dead:
            with self._lock:
                self.receivers = [(k, r) for k, r in self.receivers if not _dead(r)]
        return live

    def has_listeners(self, sender: Any = None) -> bool:
        return bool(self.receivers) and bool(self._live(sender))

    def send(self, sender: Any, **named: Any) -> list[tuple[Callable[..., Any], Any]]:
        """Call every receiver connected for ``sender`` with ``signal``, ``sender`` and
        ``named``; returns ``[(receiver, its return value or the exception it raised)]``."""
        if not self.receivers:
            return []
        responses: list[tuple[Callable[..., Any], Any]] = []
        for fn in self._live(sender):
            try:
                responses.append((fn, fn(signal=self, sender=sender, **named)))
            except Exception as exc:
                log.exception("Signal handler %r raised: %r", fn, exc)
                responses.append((fn, exc))
        return responses

    send_robust = send


def _dead(held: Any) -> bool:
    return isinstance(held, weakref.ref) and held() is None


def _retrying(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(**named: Any) -> Any:
        pauses = iter(RETRY_PAUSES)
        while True:
            try:
                return fn(**named)
            except Exception as exc:
                pause = next(pauses, RETRY_PAUSES[-1])
                log.error("Signal receiver %r raised %r; calling it again in %ss", fn, exc,
                          pause)
                time.sleep(pause)

    return call


# --------------------------------------------------------------------------- tasks
# sent by the producer
before_task_publish = Signal("before_task_publish", {
    "body", "exchange", "routing_key", "headers", "properties", "declare", "retry_policy"})
after_task_publish = Signal("after_task_publish", {"body", "exchange", "routing_key"})
#: Celery's deprecated predecessor of after_task_publish; never sent (as in Celery 5)
task_sent = Signal("task_sent", {"task_id", "task", "args", "kwargs", "eta", "taskset"})
# sent by the worker
task_received = Signal("task_received", {"request"})
task_prerun = Signal("task_prerun", {"task_id", "task", "args", "kwargs"})
task_postrun = Signal("task_postrun", {"task_id", "task", "args", "kwargs", "retval"})
task_success = Signal("task_success", {"result", "runtime"})
task_retry = Signal("task_retry", {"request", "reason", "einfo"})
task_failure = Signal("task_failure", {
    "task_id", "exception", "args", "kwargs", "traceback", "einfo"})
task_internal_error = Signal("task_internal_error", {
    "task_id", "args", "kwargs", "request", "exception", "traceback", "einfo"})
task_revoked = Signal("task_revoked", {"request", "terminated", "signum", "expired"})
task_rejected = Signal("task_rejected", {"message", "exc"})
task_unknown = Signal("task_unknown", {"message", "exc", "name", "id"})

# --------------------------------------------------------------------------- programs
celeryd_init = Signal("celeryd_init", {"instance", "conf", "options"})
celeryd_after_setup = Signal("celeryd_after_setup", {"instance", "conf"})
import_modules = Signal("import_modules")
worker_init = Signal("worker_init")
worker_before_create_process = Signal("worker_before_create_process")
worker_process_init = Signal("worker_process_init")
worker_process_shutdown = Signal("worker_process_shutdown")
worker_ready = Signal("worker_ready")
worker_shutdown = Signal("worker_shutdown")
worker_shutting_down = Signal("worker_shutting_down")
heartbeat_sent = Signal("heartbeat_sent")
setup_logging = Signal("setup_logging", {"loglevel", "logfile", "format", "colorize"})
after_setup_logger = Signal("after_setup_logger", {
    "logger", "loglevel", "logfile", "format", "colorize"})
after_setup_task_logger = Signal("after_setup_task_logger", {
    "logger", "loglevel", "logfile", "format", "colorize"})
beat_init = Signal("beat_init")
beat_embedded_init = Signal("beat_embedded_init")
user_preload_options = Signal("user_preload_options", {"app", "options"})
# Celery's eventlet pool's signals: celeriac has no eventlet pool, so they are never
# sent; they exist so that code connecting to them imports unchanged.
eventlet_pool_started = Signal("eventlet_pool_started")
eventlet_pool_preshutdown = Signal("eventlet_pool_preshutdown")
eventlet_pool_postshutdown = Signal("eventlet_pool_postshutdown")
eventlet_pool_apply = Signal("eventlet_pool_apply", {"target", "args", "kwargs"})

__all__ = [
    "Signal", "after_setup_logger", "after_setup_task_logger", "after_task_publish",
    "beat_embedded_init", "beat_init", "before_task_publish", "celeryd_after_setup",
    "celeryd_init", "eventlet_pool_apply", "eventlet_pool_postshutdown",
    "eventlet_pool_preshutdown", "eventlet_pool_started", "heartbeat_sent",
    "import_modules", "setup_logging", "task_failure", "task_internal_error",
    "task_postrun", "task_prerun", "task_received", "task_rejected", "task_retry",
    "task_revoked", "task_sent", "task_success", "task_unknown", "user_preload_options",
    "worker_before_create_process", "worker_init", "worker_process_init",
    "worker_process_shutdown", "worker_ready", "worker_shutdown", "worker_shutting_down",
]
