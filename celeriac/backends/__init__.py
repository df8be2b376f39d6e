"""Result backends by URL scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exceptions import ImproperlyConfigured
from .base import Backend, Record, history_entry

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["Backend", "Record", "backend_from_url", "history_entry"]


def backend_from_url(app: Celeriac, url: str) -> Backend:
    scheme = url.partition("://")[0]
    if scheme in ("sqlite", "db+sqlite"):
        from .sqlite import SQLiteBackend

        return SQLiteBackend(app, url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBackend

        return RedisBackend(app, url)
    if scheme == "rpc":
        from .rpc import RPCBackend

        return RPCBackend(app, url)
    if scheme == "file":
        from .file import FileBackend

        return FileBackend(app, url)
    if scheme in ("memory", "cache+memory"):
        from .memory import MemoryBackend

        return MemoryBackend(app, url)
    raise ImproperlyConfigured(
        f"no result backend for URL scheme {scheme!r} ({url!r}); celeriac speaks "
        "sqlite://, redis://, rediss://, rpc://, file:// and memory://"
    )
