"""celeriac: Celery's API, wire protocol and stored results, with exact task states.

Switch from Celery by changing one import::

    from celeriac import Celery
"""

from . import signals, states
from .app import Celeriac, Celery, current_app
from .exceptions import (
    CeleriacError,
    ImproperlyConfigured,
    NotRegistered,
    TimeoutError,
    UnsafeTaskId,
)
from .result import AsyncResult, EagerResult
from .task import Request, Task

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Celeriac",
    "CeleriacError",
    "Celery",
    "EagerResult",
    "ImproperlyConfigured",
    "NotRegistered",
    "Request",
    "Task",
    "TimeoutError",
    "UnsafeTaskId",
    "current_app",
    "signals",
    "states",
]
