"""Where a task goes: ``task_routes``, ``task_queues`` and the default queue, as in Celery.

``task_routes`` is a router or a list of them.  A router is a dict (exact task names, or
glob patterns such as ``'feeds.*'``) whose values are a queue name or a dict of options
(``{'queue': 'feeds', 'priority': 5}``), or a callable
``router(name, args, kwargs, options, task=None)`` returning such a value or None.  The
first router with an answer wins; options given to ``apply_async`` win over it.

``task_queues`` lists the queues (names, or kombu ``Queue`` objects whose exchange,
routing key and ``queue_arguments`` are used when declaring them on RabbitMQ).  A worker
with no ``-Q`` consumes all of them; without ``task_queues``, ``task_default_queue``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Router = Callable[..., Any]


@dataclass(frozen=True)
class QueueSpec:
    """How a queue is declared on RabbitMQ (the same as Celery declares it)."""

    name: str
    exchange: str
    exchange_type: str = "direct"
    routing_key: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)


def _map_router(table: Any) -> Router:
    items = table.items() if isinstance(table, Mapping) else table
    exact: dict[str, Any] = {}
    patterns: list[tuple[re.Pattern[str], Any]] = []
    for key, value in items:
        if isinstance(key, re.Pattern):
            patterns.append((key, value))
        elif "*" in key:
            patterns.append((re.compile(fnmatch.translate(key)), value))
        else:
            exact[key] = value

    def route(name: str, *_: Any, **__: Any) -> Any:
        if name in exact:
            return exact[name]
        for regex, value in patterns:
            if regex.match(name):
                return value
        return None

    return route


def prepare(routes: Any) -> list[Router]:
    if not routes:
        return []
    if not isinstance(routes, list | tuple) or (
            routes and isinstance(routes[0], tuple) and len(routes[0]) == 2
            and isinstance(routes[0][0], str)):
        routes = [routes]
    out: list[Router] = []
    for r in routes:
        if isinstance(r, Mapping | list | tuple):
            out.append(_map_router(r))
        elif hasattr(r, "route_for_task"):
            out.append(lambda name, args, kwargs, options, task=None, _r=r:
                       _r.route_for_task(name, args, kwargs))
        else:
            out.append(r)
    return out


def _named(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without unset values, a kombu ``Queue`` given as ``queue`` by its name."""
    out = {k: v for k, v in options.items() if v is not None}
    if not isinstance(out.get("queue", ""), str):
        out["queue"] = getattr(out["queue"], "name", None)
    return out


def route_options(routers: list[Router], name: str, args: Any, kwargs: Any,
                  options: dict[str, Any]) -> dict[str, Any]:
    """The routing options for sending task ``name``: explicit ``options`` over the first
    router's answer (a queue is a name or a kombu ``Queue``, in both)."""
    for router in routers:
        found = router(name, args, kwargs, options, task=None)
        if found is None:
            continue
        routed = {"queue": found} if isinstance(found, str) else dict(found)
        return {**_named(routed), **_named(options)}
    return _named(options)


def queue_specs(conf: Any) -> dict[str, QueueSpec]:
    """``task_queues`` (and the default queue) as declarations."""
    max_priority = conf.get("task_queue_max_priority")
    base_args = {"x-max-priority": int(max_priority)} if max_priority else {}
    default = conf.task_default_queue
    specs: dict[str, QueueSpec] = {}
    for q in conf.get("task_queues") or ():
        if isinstance(q, str):
            specs[q] = QueueSpec(q, q, routing_key=q, arguments=dict(base_args))
            continue
        exchange = getattr(q, "exchange", None)
        specs[q.name] = QueueSpec(
            q.name,
            exchange=getattr(exchange, "name", None) or q.name,
            exchange_type=getattr(exchange, "type", None) or "direct",
            routing_key=getattr(q, "routing_key", None) or q.name,
            arguments={**base_args, **(getattr(q, "queue_arguments", None) or {})},
        )
    if default not in specs:
        exchange = conf.get("task_default_exchange") or default
        key = conf.get("task_default_routing_key") or default
        specs[default] = QueueSpec(default, exchange, conf.get("task_default_exchange_type")
                                   or "direct", key, dict(base_args))
    return specs
