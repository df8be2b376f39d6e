"""Telling a lost connection from a failure, and waiting one out.

A broker or result store that goes away (stopped, restarted, loading its append-only
file, a dropped socket) is never a task's fault: what failed for that reason is tried
again once the server answers, never stored as the task's FAILURE nor set aside.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("celeriac.worker")

#: Pauses between attempts while a server is away (seconds; then the last one each time).
PAUSES = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


@cache
def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # sockets: refused, reset, timed out
    try:
        import redis

        # (BusyLoadingError, a Redis loading its data after a restart, is one of these)
        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:
        pass
    try:
        import amqp

        errors += [amqp.exceptions.ConnectionError, amqp.exceptions.RecoverableChannelError]
    except ImportError:
        pass
    try:
        import aiormq

        errors += [aiormq.exceptions.AMQPConnectionError,
                   aiormq.exceptions.ChannelInvalidStateError]
    except ImportError:
        pass
    return tuple(errors)


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to a server is lost or refused (as opposed to
    a bug, or something the server will never accept)."""
    return isinstance(exc, _connection_errors())


def describe(error: BaseException) -> str:
    """``Class: message``, the message cut to a few hundred characters (for logs)."""
    text = str(error)
    return f"{type(error).__name__}: {text if len(text) <= 300 else text[:300] + '...'}"


async def retrying(step: Callable[[], Awaitable[T]], what: str, *,
                   retry_if: Callable[[BaseException], bool] = lost,
                   stopping: asyncio.Event | None = None,
                   pauses: Sequence[float] = PAUSES) -> T:
    """Run ``step`` until it succeeds.  An error ``retry_if`` accepts (by default a lost
    connection) is logged and ``step`` run again after a pause: each of ``pauses`` in
    turn, then the last one each time.  Any other error is raised, and so is the last
    one once ``stopping`` is set (no more waiting then)."""
    attempt = 0
    while True:
        try:
            return await step()
        except Exception as exc:
            if not retry_if(exc) or (stopping is not None and stopping.is_set()):
                raise
            pause = pauses[min(attempt, len(pauses) - 1)]
            attempt += 1
            log.warning("%s failed (%s); retrying in %ss", what, describe(exc), pause)
            if stopping is None:
                await asyncio.sleep(pause)
                continue
            waiter = asyncio.ensure_future(stopping.wait())
            try:
                await asyncio.wait({waiter}, timeout=pause)
            finally:
                waiter.cancel()


async def until_connected(step: Callable[[], Awaitable[T]], what: str,
                          stopping: asyncio.Event, pauses: Sequence[float] = PAUSES) -> T:
    """Run ``step`` until it does not fail for a lost connection (other errors are
    raised), pausing between attempts.  Once ``stopping`` is set the last error is
    raised instead of waiting on."""
    return await retrying(step, what, stopping=stopping, pauses=pauses)
