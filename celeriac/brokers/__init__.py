"""Brokers by URL scheme."""

from __future__ import annotations

from typing import Any

from ..exceptions import ImproperlyConfigured
from .base import Broker, Consumer

__all__ = ["Broker", "Consumer", "broker_from_url"]


def broker_from_url(url: str, transport_options: dict[str, Any] | None = None) -> Broker:
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        from .sqlite import SQLiteBroker

        return SQLiteBroker(url, transport_options)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBroker

        return RedisBroker(url, transport_options)
    if scheme in ("amqp", "pyamqp"):
        from .amqp import AMQPBroker

        return AMQPBroker(url, transport_options)
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(url, transport_options)
    raise ImproperlyConfigured(
        f"no broker for URL scheme {scheme!r} ({url!r}); celeriac speaks sqlite://, "
        "amqp://, pyamqp://, redis://, rediss:// and memory://"
    )
