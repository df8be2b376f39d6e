"""The application: configuration, the task registry, and sending tasks."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, overload
from zoneinfo import ZoneInfo

from . import states
from .backends import Backend, backend_from_url
from .backends.base import Record, history_entry
from .brokers import Broker, broker_from_url
from .conf import Settings, settings_from_object
from .control import Control
from .protocol import EMBED_DEFAULTS, Message, build_task_message, new_id, origin_name
from .result import AsyncResult
from .routing import QueueSpec, prepare, queue_specs, route_options
from .signals import Signal, after_task_publish, before_task_publish
from .task import Task, current_request, eta_from, expires_from, warn_unsupported_options

P = ParamSpec("P")
R = TypeVar("R")

#: Where the embedded broker lives when nothing else is configured.
DEFAULT_BROKER_URL = "sqlite:///celeriac.db"

_current_app: Celeriac | None = None


def current_app() -> Celeriac:
    """The most recently created app (what ``AsyncResult(id)`` uses when given no app)."""
    if _current_app is None:
        raise RuntimeError("no celeriac app has been created in this process")
    return _current_app


class Celeriac:
    """A celeriac application; ``celeriac.Celery`` is the same class under Celery's name.

    ``Celery('proj', broker=..., backend=..., include=[...], **settings)``.  With no
    broker configured anywhere, the embedded SQLite broker is used (file
    ``celeriac.db`` in the current directory); with no result backend, results go
    to the broker's own store when it has one (see :meth:`default_backend_url`).
    """

    def __init__(self, main: str | None = None, broker: str | None = None,
                 backend: str | None = None, include: list[str] | tuple[str, ...] | None = None,
                 **settings: Any) -> None:
        global _current_app
        self.main = main
        self._conf = Settings(settings)
        self._configured = False
        self._finalized = False
        if broker:
            self._conf.broker_url = broker
        if backend:
            self._conf.result_backend = backend
        if include:
            self._conf.include = tuple(include)
        self._tasks: dict[str, Task[Any, Any]] = {}
        #: Celery's app signals, sent with ``sender=app``: ``on_configure`` and
        #: ``on_after_configure`` (``source=conf``) when the settings are first read,
        #: ``on_after_finalize`` when the task registry is first used, and
        #: ``on_after_fork`` in each new worker process.
        self.on_configure = Signal("app.on_configure")
        self.on_after_configure = Signal("app.on_after_configure", {"source"})
        self.on_after_finalize = Signal("app.on_after_finalize")
        self.on_after_fork = Signal("app.on_after_fork")
        self._lock = threading.Lock()
        self._broker: Broker | None = None
        self._backend: Backend | None = None
        self._oid, self._oid_pid = "", 0
        self._prepared_routes: tuple[Any, list[Any]] = (object(), [])
        _current_app = self

    def __repr__(self) -> str:
        return f"<Celeriac {self.main or '__main__'}>"

    # ------------------------------------------------------------------ configuration

    @property
    def conf(self) -> Settings:
        """The settings.  As in Celery, the first read sends ``on_configure`` and then
        ``on_after_configure``: connect their receivers before anything reads it
        (``config_from_object`` does not)."""
        if not self._configured:
            self._configured = True
            self.on_configure.send(sender=self)
            self.on_after_configure.send(sender=self, source=self._conf)
        return self._conf

    def config_from_object(self, obj: Any, namespace: str | None = None) -> None:
        self._conf.update(settings_from_object(obj, namespace))
        self._reset_connections()

    @property
    def tasks(self) -> dict[str, Task[Any, Any]]:
        """The task registry (name -> task); its first use finalizes the app."""
        if not self._finalized:
            self.finalize()
        return self._tasks

    def finalize(self) -> None:
        """Close the registry's set-up: sends ``on_after_finalize`` (once)."""
        if not self._finalized:
            self._finalized = True
            self.on_after_finalize.send(sender=self)

    @property
    def broker_url(self) -> str:
        return str(os.environ.get("CELERY_BROKER_URL") or self.conf.broker_url
                   or DEFAULT_BROKER_URL)

    def default_backend_url(self) -> str | None:
        """The result backend used when none is configured: the broker's own store.

        ``sqlite://`` broker -> the same SQLite file; ``redis://`` -> the same Redis
        server and database; ``amqp://`` -> ``rpc://`` (states sent back to the caller
        as messages); ``memory://`` -> ``memory://``.
        """
        url = self.broker_url
        if url.startswith(("sqlite://", "redis://", "rediss://")):
            return url
        if url.startswith(("amqp://", "pyamqp://")):
            return "rpc://"
        if url.startswith("memory://"):
            return "memory://"
        return None

    @property
    def result_backend_url(self) -> str | None:
        return (os.environ.get("CELERY_RESULT_BACKEND") or self.conf.result_backend
                or self.default_backend_url())

    def _reset_connections(self) -> None:
        self._broker = None
        self._backend = None

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    broker = broker_from_url(self.broker_url,
                                             dict(self.conf.broker_transport_options))
                    conf = self.conf
                    broker.retry_policy = (dict(conf.task_publish_retry_policy)
                                           if conf.task_publish_retry else None)
                    broker.queue_spec = self.queue_spec  # type: ignore[method-assign]
                    self._broker = broker
        return self._broker

    def _routers(self) -> list[Any]:
        """``task_routes`` prepared once (patterns compiled), again only if it changes."""
        routes = self.conf.task_routes
        if self._prepared_routes[0] is not routes:
            self._prepared_routes = (routes, prepare(routes))
        return self._prepared_routes[1]

    def queue_spec(self, name: str) -> QueueSpec:
        """How queue ``name`` is declared (``task_queues``, else Celery's defaults)."""
        specs = queue_specs(self.conf)
        return specs.get(name) or QueueSpec(name, name, routing_key=name,
                                            arguments=specs[self.conf.task_default_queue]
                                            .arguments)

    def default_queues(self) -> list[str]:
        """What a worker consumes when given no ``-Q``: ``task_queues``, else the default."""
        queues = self.conf.task_queues
        if not queues:
            return [self.conf.task_default_queue]
        return [q if isinstance(q, str) else q.name for q in queues]

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    url = self.result_backend_url
                    if url is None:
                        from .exceptions import ImproperlyConfigured

                        raise ImproperlyConfigured(
                            f"no result backend is configured and broker {self.broker_url!r} "
                            "has no store of its own: set result_backend"
                        )
                    self._backend = backend_from_url(self, url)
        return self._backend

    @property
    def timezone(self) -> tzinfo:
        """``timezone`` if set; else UTC, or the machine's zone with ``enable_utc=False``."""
        name = self.conf.timezone
        if name:
            return ZoneInfo(name) if isinstance(name, str) else name  # type: ignore[no-any-return]
        if not self.conf.enable_utc:
            return datetime.now().astimezone().tzinfo or UTC
        return UTC

    def now(self) -> datetime:
        """Current time in the app's time zone (UTC by default), as Celery's ``app.now()``."""
        return datetime.now(self.timezone)

    # ------------------------------------------------------------------ tasks

    def gen_task_name(self, name: str, module: str) -> str:
        if module == "__main__" and self.main:
            module = self.main
        return f"{module}.{name}"

    @overload
    def task(self, fun: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, *, bind: Literal[True], name: str | None = None,
             **options: Any) -> Callable[[Callable[Concatenate[Any, P], R]], Task[P, R]]: ...

    @overload
    def task(self, *, bind: Literal[False] = False, name: str | None = None,
             **options: Any) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(  # type: ignore[misc]
        self, fun: Callable[..., Any] | None = None, /, *, bind: bool = False,
        name: str | None = None, **options: Any,
    ) -> Any:
        """Register a function as a task: ``@app.task`` or ``@app.task(bind=True, ...)``."""

        def register(f: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or self.gen_task_name(f.__name__, f.__module__)
            task: Task[Any, Any] = Task(self, f, task_name, bind=bind, **options)
            self._tasks[task_name] = task
            return task

        return register(fun) if fun is not None else register

    def send_task(
        self,
        name: str,
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
        ignore_result: bool = False,
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        headers: dict[str, Any] | None = None,
        shadow: str | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Queue task ``name`` (which need not be registered here) and return its result.

        ``headers`` are added to the message's headers (a worker shows them in
        ``self.request.headers``); ``shadow`` is the name shown for the task in logs.
        Any other option warns once that it has no effect (see
        :func:`celeriac.task.warn_unsupported_options`)."""
        if options:
            warn_unsupported_options(options)
        conf = self.conf
        task_id = task_id or new_id()
        routed = route_options(self._routers(), name, args, kwargs,
                               {"queue": queue, "priority": priority})
        queue = routed.get("queue") or conf.task_default_queue
        priority = routed.get("priority")
        now = self.now()
        parent = current_request()
        message = build_task_message(
            name, args or (), kwargs or {},
            task_id=task_id, queue=queue, serializer=serializer or conf.task_serializer,
            root_id=(parent.root_id or parent.id) if parent else None,
            parent_id=parent.id if parent else None,
            eta=eta_from(countdown, eta, now), expires=expires_from(expires, now),
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            ignore_result=ignore_result,
            priority=priority if priority is not None else conf.task_default_priority,
            reply_to=self.oid, shadow=shadow, headers=headers,
        )
        sent = None if ignore_result else [Record(task_id, history_entry(
            states.PENDING, {"task": name, "queue": queue}, hostname=origin_name()))]
        self.publish(message, args or (), kwargs or {}, sent)
        return AsyncResult(task_id, app=self, task_name=name)

    def publish(self, message: Message, args: tuple[Any, ...] | list[Any],
                kwargs: dict[str, Any], sent: list[Record] | None = None) -> None:
        """Publish a task message (after writing ``sent``, its "sent" history, where
        given), between Celery's ``before_task_publish`` and ``after_task_publish``
        signals (sent only when something listens).  A ``before_task_publish``
        receiver may change ``headers`` and ``properties``: what it changes is sent."""
        name = message.headers["task"]
        body = None
        if before_task_publish.receivers or after_task_publish.receivers:
            body = (tuple(args), dict(kwargs), dict(EMBED_DEFAULTS))
        if before_task_publish.receivers:
            properties = {k: message.properties.get(k) for k in ("correlation_id", "reply_to")}
            before_task_publish.send(
                sender=name, body=body, exchange="", routing_key=message.queue,
                headers=message.headers, properties=properties,
                declare=[self.queue_spec(message.queue)],
                retry_policy=dict(self.conf.task_publish_retry_policy))
            message.properties.update(properties)
        if sent is None:
            self.broker.publish(message)
        else:
            self.broker.publish_after(self.backend, sent, message)
        if after_task_publish.receivers:
            after_task_publish.send(sender=name, body=body, headers=message.headers,
                                    exchange="", routing_key=message.queue)

    @property
    def control(self) -> Control:
        """Remote control of the workers (``app.control.revoke(...)``)."""
        return Control(self)

    def AsyncResult(self, task_id: str) -> AsyncResult[Any]:  # noqa: N802 - Celery's name
        return AsyncResult(task_id, app=self)

    @property
    def oid(self) -> str:
        """This process's reply address (a uuid), sent as ``reply_to`` with every task:
        where an ``rpc://`` result backend sends the task's states."""
        if self._oid_pid != os.getpid():
            self._oid, self._oid_pid = new_id(), os.getpid()
        return self._oid

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
        if self._backend is not None:
            self._backend.close()
        self._reset_connections()


Celery = Celeriac
