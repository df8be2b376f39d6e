"""Everything Celery-specific about bytes: task messages (protocol v2), the kombu
envelope used by key-value transports, exceptions in results, and result metas.

Brokers and backends call into this module; none of them knows Celery's formats.
"""

from __future__ import annotations

import base64
import builtins
import functools
import inspect
import os
import re
import reprlib
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import serialization
from .exceptions import (
    CELERY_EXC_MODULE,
    CELERY_NAMED,
    STORED_NAME,
    DecodeError,
    EncodeError,
    SecurityError,
    UnsafeTaskId,
)

EMBED_DEFAULTS: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None,
                                  "chord": None}

_repr = reprlib.Repr()
_repr.maxstring = 256
_repr.maxother = 256
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 32


def saferepr(obj: Any) -> str:
    try:
        return _repr.repr(obj)
    except Exception:  # a broken __repr__ must not stop a publish
        return f"<unrepresentable {type(obj).__name__}>"


_origin: tuple[int, str] = (0, "")


def origin_name() -> str:
    """Celery's ``anon_nodename()``: ``gen<pid>@<host>`` (worked out once per process)."""
    global _origin
    pid = os.getpid()
    if _origin[0] != pid:
        _origin = (pid, f"gen{pid}@{socket.gethostname()}")
    return _origin[1]


def new_id() -> str:
    return str(uuid.uuid4())


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,254}")


def check_task_id(task_id: str) -> str:
    """Refuse ids that cannot be a file name or key safely (``/``, ``..``, control chars)."""
    if not isinstance(task_id, str) or not _SAFE_ID.fullmatch(task_id) or ".." in task_id:
        raise UnsafeTaskId(
            f"task id {task_id!r} is not safe as a storage key: use letters, digits and "
            "._:@+=- (no path separators, no '..', at most 255 characters)"
        )
    return task_id


# --------------------------------------------------------------------------- messages


@dataclass
class Message:
    """A message as a transport hands it over: Celery headers, encoded body, AMQP properties."""

    headers: dict[str, Any]
    body: bytes
    content_type: str
    content_encoding: str
    properties: dict[str, Any] = field(default_factory=dict)
    queue: str = ""
    tag: Any = None  # transport's handle for ack/reject
    redelivered: bool = False
    raw: bytes | None = None  # the bytes the transport delivered, when it keeps them

    @property
    def delivery_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(self.properties.get("delivery_info") or {})
        info.setdefault("exchange", "")
        info.setdefault("routing_key", self.queue)
        info["redelivered"] = self.redelivered
        return info


#: Header names of Celery's task protocol and names Celery's worker gives a task's request
#: itself (``celery.app.task.Context``): a custom header (``apply_async(headers=...)``)
#: may not use one of them.
RESERVED_HEADERS = frozenset("""
lang task id shadow eta expires group group_index retries timelimit root_id parent_id
argsrepr kwargsrepr origin ignore_result replaced_task_nesting stamped_headers stamps
compression args kwargs callbacks errbacks chain chord correlation_id delivery_info
headers hostname is_eager logfile loglevel properties reply_to taskset time_limit
soft_time_limit utc called_directly
""".split())  # noqa: SIM905


def custom_headers(headers: dict[str, Any]) -> dict[str, Any] | None:
    """The headers of a task message beyond the protocol's own (what a producer gave as
    ``apply_async(headers=...)``), or None when there are none: as Celery's worker
    shows them in ``self.request.headers``."""
    if headers.keys() <= RESERVED_HEADERS:  # the usual case, and the quick one
        return None
    return {k: v for k, v in headers.items() if k not in RESERVED_HEADERS}


def build_task_message(
    name: str,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    *,
    task_id: str,
    queue: str,
    serializer: str,
    root_id: str | None = None,
    parent_id: str | None = None,
    group_id: str | None = None,
    retries: int = 0,
    eta: datetime | None = None,
    expires: datetime | None = None,
    time_limit: float | None = None,
    soft_time_limit: float | None = None,
    ignore_result: bool = False,
    reply_to: str | None = None,
    priority: int | None = None,
    shadow: str | None = None,
    headers: dict[str, Any] | None = None,
) -> Message:
    """Build a protocol v2 task message exactly as Celery 5.7 lays it out; ``headers``
    are custom headers added to the protocol's own (which they may not replace)."""
    check_task_id(task_id)
    args = list(args)
    kwargs = dict(kwargs)
    own: dict[str, Any] = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": shadow,
        "eta": eta.isoformat() if eta else None,
        "expires": expires.isoformat() if expires else None,
        "group": group_id,
        "group_index": None,
        "retries": retries,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id,
        "parent_id": parent_id,
        "argsrepr": saferepr(tuple(args)),
        "kwargsrepr": saferepr(kwargs),
        "origin": origin_name(),
        "ignore_result": ignore_result,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    if headers:
        clash = sorted(k for k in headers if k in RESERVED_HEADERS)
        if clash:
            raise ValueError(f"custom headers {clash} of task {name} would replace headers "
                             "of the task protocol (or of the task's request): rename them")
        own.update(headers)
    body_obj = [args, kwargs, dict(EMBED_DEFAULTS)]
    try:
        content_type, encoding, body = serialization.dumps(body_obj, serializer)
    except EncodeError:
        raise _name_unserializable(name, args, kwargs, serializer) from None
    properties: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": reply_to or "",
        "delivery_mode": 2,
        "priority": priority or 0,
        "delivery_info": {"exchange": "", "routing_key": queue},
    }
    # No AMQP ``expiration`` property (Celery sets one): RabbitMQ would drop the message
    # silently when it expires and the task would stay PENDING for ever; kept, it reaches
    # a worker, which stores REVOKED ('expired') without running it.
    return Message(own, body, content_type, encoding, properties, queue=queue)


def retry_message(call: TaskCall, *, retries: int, eta: datetime | None,
                  args: list[Any] | tuple[Any, ...] | None = None,
                  kwargs: dict[str, Any] | None = None, queue: str | None = None,
                  priority: int | None = None) -> Message:
    """The message that runs ``call`` again: the same id and headers (so the same root,
    parent, group, limits and expiry), ``retries`` and ``eta`` set, new arguments if
    given, to the queue it came from unless told otherwise."""
    old = call.message
    headers = dict(call.headers)
    headers.update(retries=retries, eta=eta.isoformat() if eta else None,
                   origin=origin_name())
    body, content_type, encoding = old.body, old.content_type, old.content_encoding
    if args is not None or kwargs is not None:
        new_args = list(call.args if args is None else args)
        new_kwargs = dict(call.kwargs if kwargs is None else kwargs)
        serializer = serialization.get_serializer(content_type).name
        try:
            content_type, encoding, body = serialization.dumps(
                [new_args, new_kwargs, call.embed], serializer)
        except EncodeError:
            raise _name_unserializable(call.name, new_args, new_kwargs, serializer) from None
        headers.update(argsrepr=saferepr(tuple(new_args)), kwargsrepr=saferepr(new_kwargs))
    queue = queue or old.queue
    properties = {k: v for k, v in old.properties.items()
                  if k not in ("delivery_info", "delivery_tag", "body_encoding", "expiration")}
    properties["delivery_info"] = {"exchange": "", "routing_key": queue}
    if priority is not None:
        properties["priority"] = priority
    return Message(headers, body, content_type, encoding, properties, queue=queue)


def _name_unserializable(name: str, args: list[Any], kwargs: dict[str, Any],
                         serializer: str) -> EncodeError:
    """Find which argument could not be encoded and say so."""
    places = [(f"argument {i}", v) for i, v in enumerate(args)]
    places += [(f"keyword argument {k!r}", v) for k, v in kwargs.items()]
    for where, value in places:
        try:
            serialization.dumps(value, serializer)
        except EncodeError as exc:
            return EncodeError(
                f"{where} of task {name} ({saferepr(value)}, type {type(value).__name__}) "
                f"cannot be serialized with {serializer}: {exc.__cause__ or exc}"
            )
    return EncodeError(f"the arguments of task {name} cannot be serialized with {serializer}")


@dataclass
class TaskCall:
    """A parsed task message: what the worker needs to run it."""

    id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any]
    headers: dict[str, Any]
    message: Message

    @property
    def retries(self) -> int:
        return int(self.headers.get("retries") or 0)


def task_id_of(message: Message) -> str | None:
    """The task id a message claims, when it has a usable one (even if the rest is broken)."""
    tid = message.headers.get("id") if isinstance(message.headers, dict) else None
    if not tid:
        tid = message.properties.get("correlation_id")
    try:
        return check_task_id(tid) if tid else None
    except UnsafeTaskId:
        return None


def parse_task_message(message: Message, accept: frozenset[str]) -> TaskCall:
    """Decode a protocol v2 message; raises DecodeError naming what is wrong."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        raise DecodeError("not a Celery protocol v2 task message (no 'task' header)")
    task_id = headers.get("id")
    if not task_id:
        raise DecodeError("task message has no 'id' header")
    check_task_id(task_id)
    body = serialization.loads(message.body, message.content_type, accept)
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise DecodeError("task message body is not [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise DecodeError("task message body has args that are not a list or kwargs not a dict")
    _check_headers(headers)
    return TaskCall(task_id, str(headers["task"]), list(args), kwargs, embed or {},
                    headers, message)


def aware_time(value: datetime | str) -> datetime:
    """A task's ``eta`` or ``expires`` (an ISO 8601 header, or a datetime given to
    ``apply_async``) as an aware datetime.  A naive value is taken as UTC: that is how
    Celery 5.7's worker reads one (``maybe_make_aware``), whatever the app's ``timezone``
    and ``enable_utc``, and how its producers mean one.  Raises ValueError or TypeError
    for something that is not an ISO 8601 date-time."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if when.tzinfo is None or when.utcoffset() is None:
        return when.replace(tzinfo=UTC)
    return when


def _check_headers(headers: dict[str, Any]) -> None:
    """Header values the worker relies on must have the types Celery sends."""

    def fail(name: str, wanted: str) -> None:
        raise DecodeError(f"task message header {name!r} must be {wanted}, "
                          f"not {saferepr(headers.get(name))}")

    retries = headers.get("retries", 0)
    if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
        fail("retries", "an integer")
    limits = headers.get("timelimit")
    if limits is not None and not (
            isinstance(limits, list | tuple) and len(limits) == 2
            and all(x is None or isinstance(x, int | float) for x in limits)):
        fail("timelimit", "[hard, soft] (numbers or null)")
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            aware_time(value)
        except (TypeError, ValueError):
            fail(name, "an ISO 8601 date-time or null")
    for name in ("root_id", "parent_id", "group", "origin"):
        value = headers.get(name)
        if value is not None and not isinstance(value, str):
            fail(name, "a string or null")


def encode_envelope(message: Message) -> bytes:
    """kombu's key-value envelope: JSON with a base64 body (Redis lists, SQLite rows)."""
    props = dict(message.properties)
    props["body_encoding"] = "base64"
    props.setdefault("delivery_tag", new_id())
    envelope = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": props,
    }
    return serialization.json_dumps(envelope)


#: The fanout exchange of Celery's remote-control mailbox.
CONTROL_EXCHANGE = "celery.pidbox"
#: How long a control command is good for (its ``expires`` header; Celery: 1 s).
CONTROL_TTL = 10.0


def control_message(command: dict[str, Any]) -> Message:
    """A remote-control command as Celery's mailbox publishes it: JSON body, headers
    ``clock`` and ``expires``, to the fanout exchange ``celery.pidbox``, routing key ''."""
    return Message({"clock": 1, "expires": time.time() + CONTROL_TTL},
                   serialization.json_dumps(command), "application/json", "utf-8",
                   {"delivery_mode": 2, "priority": 0,
                    "delivery_info": {"exchange": CONTROL_EXCHANGE, "routing_key": ""}})


def control_command(message: Message) -> dict[str, Any]:
    """The command a control message carries (raises DecodeError when it has none)."""
    try:
        command = serialization.json_loads(message.body)
    except ValueError as exc:
        raise DecodeError(f"malformed control message: {exc}") from exc
    if not isinstance(command, dict):
        raise DecodeError(f"control message is not an object: {saferepr(command)}")
    return command


def decode_envelope(data: bytes, queue: str) -> Message:
    try:
        env = serialization.json_loads(data)
        props = env.get("properties") or {}
        body = env["body"]
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        elif isinstance(body, str):
            body = body.encode(env.get("content-encoding") or "utf-8")
        return Message(env.get("headers") or {}, body, env.get("content-type") or "",
                       env.get("content-encoding") or "", props, queue=queue)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise DecodeError(f"malformed message envelope: {exc}") from exc


# --------------------------------------------------------------------------- exceptions


def _serializable(value: Any) -> Any:
    try:
        serialization.json_dumps(value)
        return value
    except (TypeError, ValueError):
        return saferepr(value)


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """Celery's JSON form of an exception."""
    cls = type(exc)
    module, name = STORED_NAME.get(cls) or (cls.__module__, cls.__qualname__)
    if module == "celeriac.exceptions":
        module = CELERY_EXC_MODULE
    return {
        "exc_type": name,
        "exc_message": [_serializable(a) for a in exc.args],
        "exc_module": module,
    }


def stored_form(value: Any) -> Any:
    """A result or meta as stored: an exception in Celery's JSON form, anything else
    as it is."""
    return exception_to_dict(value) if isinstance(value, BaseException) else value


#: How many synthesized exception classes are kept (least recently used dropped first):
#: a store naming many distinct classes cannot make a reader grow without bound.
SYNTHESIZED_CACHE_SIZE = 256


@functools.lru_cache(maxsize=SYNTHESIZED_CACHE_SIZE)
def _synthesize(name: str, module: str) -> type[Exception]:
    """An ``Exception`` subclass standing for stored class ``module.name`` (the same
    class for the same name while it stays in the cache)."""
    cls = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": module})
    cls.__qualname__ = name
    return cls


def _loaded_attribute(module: str, name: str) -> Any:
    """``module.name`` when ``module`` is loaded already, looked up without running code
    (no module ``__getattr__``, no descriptors); None when absent."""
    obj: Any = builtins if module == "builtins" else sys.modules.get(module)
    try:
        for part in name.split("."):
            if obj is None:
                return None
            obj = inspect.getattr_static(obj, part)
    except AttributeError:
        return None
    return obj


def _resolve_exception_class(name: str, module: str | None) -> type[Exception]:
    """The class a stored ``exc_type`` / ``exc_module`` names, found only among celeriac's
    and Celery's names and modules already loaded; never imports anything.  A name found
    nowhere gets a synthesized ``Exception`` subclass; a ``BaseException``-only class
    (SystemExit, KeyboardInterrupt...) is replaced by one too, so that re-raising it in
    the reader is an ordinary error.  A name that is not an exception class is refused."""
    if module is None:
        return _synthesize(name, CELERY_EXC_MODULE)
    if (module, name) in CELERY_NAMED:
        return CELERY_NAMED[module, name]  # type: ignore[return-value]
    obj = _loaded_attribute(module, name)
    if obj is None:
        return _synthesize(name, module)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise SecurityError(f"stored exception type {module}.{name} is not an exception class")
    if not issubclass(obj, Exception):
        return _synthesize(name, module)
    return obj


def exception_from_dict(data: Any) -> Exception:
    """Rebuild an exception from its stored form; never imports, never unpickles."""
    if isinstance(data, Exception):
        return data
    if isinstance(data, BaseException):  # SystemExit and the like: an ordinary error here
        data = exception_to_dict(data)
    if not isinstance(data, dict) or "exc_type" not in data:
        raise DecodeError(f"stored exception has no 'exc_type': {saferepr(data)}")
    module = data.get("exc_module")
    cls = _resolve_exception_class(str(data["exc_type"]),
                                   None if module is None else str(module))
    message = data.get("exc_message", "")
    try:
        if isinstance(message, list | tuple):
            return cls(*message)
        return cls(message)
    except Exception:
        return Exception(f"{cls.__qualname__}({message!r})")


# --------------------------------------------------------------------------- result metas


@dataclass
class RequestInfo:
    """The parts of a task request that go into a stored result."""

    id: str
    task: str | None = None
    args: Any = None
    kwargs: Any = None
    hostname: str | None = None
    retries: int = 0
    group: str | None = None
    parent_id: str | None = None
    delivery_info: dict[str, Any] | None = None
    reply_to: str | None = None  # where an rpc:// backend sends the states


def result_meta(
    task_id: str,
    state: str,
    result: Any,
    *,
    traceback: str | None = None,
    date_done: str | None = None,
    request: RequestInfo | None = None,
    extended: bool = False,
) -> dict[str, Any]:
    """A result meta in Celery's key order, ``task_id`` last (the key-value stores' form)."""
    meta: dict[str, Any] = {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": date_done,
    }
    if request is not None:
        if request.group:
            meta["group_id"] = request.group
        if request.parent_id:
            meta["parent_id"] = request.parent_id
        if extended:
            meta.update(
                name=request.task,
                args=request.args,
                kwargs=request.kwargs,
                worker=request.hostname,
                retries=request.retries,
                queue=(request.delivery_info or {}).get("routing_key"),
            )
    meta["task_id"] = task_id
    return meta
