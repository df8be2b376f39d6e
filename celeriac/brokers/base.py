"""The broker contract.

A broker moves task messages (:class:`celeriac.protocol.Message`) from producers
to workers.  Producers call :meth:`Broker.publish` synchronously; each worker
process opens one :class:`Consumer` and drives it from its event loop.

Delivery is at least once: a message handed to a consumer stays owned by it
until acked or rejected; if the consumer's process dies, the message is
delivered again (after a lease lapses, or when the connection drops).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ..protocol import Message
from ..routing import QueueSpec

T = TypeVar("T")
log = logging.getLogger("celeriac.broker")

#: Dead letters each broker keeps, at most (transport option ``dead_letter_limit``;
#: 0 keeps every one), and for how long (``dead_letter_max_age``, seconds; 0: for ever).
DEAD_LETTER_LIMIT = 10_000
DEAD_LETTER_MAX_AGE = 7 * 24 * 3600.0


def dead_letter_caps(options: Mapping[str, Any]) -> tuple[int, float]:
    """``(limit, max_age)`` of the dead-letter store from the broker's transport options."""
    limit = options.get("dead_letter_limit", DEAD_LETTER_LIMIT)
    age = options.get("dead_letter_max_age", DEAD_LETTER_MAX_AGE)
    return max(0, int(limit or 0)), max(0.0, float(age or 0))

if TYPE_CHECKING:
    from ..backends.base import Backend, Record, Roster


class Consumer(ABC):
    """One worker process's stream of messages from a set of queues."""

    #: Whether a pending ``get()`` may be cancelled without losing what it was taking.
    cancel_safe = False
    #: Whether an ack is a one-way frame (no round trip), worth sending at once.
    acks_are_frames = False

    @abstractmethod
    async def get(self, limit: int, timeout: float) -> list[Message]:
        """Up to ``limit`` messages, waiting up to ``timeout`` s for the first one."""

    @abstractmethod
    async def ack(self, messages: Sequence[Message]) -> None:
        """The messages are done with: remove them for good."""

    @abstractmethod
    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        """Give a message back (``requeue``) or set it aside as dead with ``reason``."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming; messages not acked become available to others again."""

    def holds(self, message: Message) -> bool:
        """Whether this consumer can still ack ``message``: False when its delivery was
        lost with a connection, and the broker delivers it again by itself."""
        return True

    async def park(self, message: Message, due: float) -> bool:
        """Keep a message whose ETA is far off in the broker's own storage until ``due``
        (epoch seconds), settling this delivery; False when the broker cannot, and the
        worker then waits for the ETA itself."""
        return False

    async def control(self, handle: Callable[[dict[str, Any]], None],
                      ready: Callable[[], None]) -> None:
        """Pass each remote-control command broadcast to the workers (Celery's mailbox
        body: ``{"method", "arguments", "destination", ...}``) to ``handle``, until
        cancelled; call ``ready`` once listening.  Raises when the connection is lost
        (the worker calls it again).  A broker without broadcasts just waits."""
        ready()
        await asyncio.Event().wait()

    async def pause(self) -> None:  # noqa: B027 - optional hook
        """The worker process cannot start more tasks for a while: a broker that pushes
        messages should stop and give back what it pushed and was not taken."""

    async def resume(self) -> None:  # noqa: B027 - optional hook
        """The worker process can take messages again."""

    async def settle(self, backend: Backend, records: Sequence[Record],
                     acks: Sequence[Message], io: Executor,
                     roster: Roster | None = None) -> None:
        """Write ``records`` (and ``roster``) to the result backend, then ack ``acks``.

        A consumer whose broker shares a store with the backend may do both at once.
        """
        if records or roster is not None:
            await backend.record_async(records, io, roster)
        if acks:
            await self.ack(acks)


#: The property a consumer sets on a message it could not decode (its value: why); the
#: worker sets such a message aside with that reason.
DECODE_ERROR = "celeriac_decode_error"


def undecodable(raw: bytes, queue: str, error: BaseException) -> Message:
    """A message whose bytes could not be decoded, to be set aside on its own (any error,
    RecursionError or MemoryError included: one bad message never stalls its batch)."""
    message = Message({}, bytes(raw), "", "", {}, queue=queue)
    message.properties[DECODE_ERROR] = f"undecodable message: {error!r}"[:500]
    message.raw = bytes(raw)
    return message


@runtime_checkable
class GivesBackLostNodes(Protocol):
    """A broker whose consumers note which worker node holds each delivery, so that the
    worker taking over a lost node (see ``celeriac.worker.heartbeat``) can put the
    messages it held back on their queues at once.  A broker that redelivers by itself
    when a connection drops (RabbitMQ) or whose holds lapse (SQLite leases) needs not."""

    #: the worker node this process's consumers serve (set by the worker's supervisor
    #: in each worker process; None: not noted)
    node: str | None

    def give_back_node(self, node: str) -> int:
        """Put every message ``node`` (or one process of it, ``<node>/<pid>``) holds
        back on its queue; returns how many."""
        ...


class Broker(ABC):
    #: the URL it was opened with
    url: str
    #: Celery's task_publish_retry_policy (None: do not retry), set by the app
    retry_policy: dict[str, Any] | None = None
    #: how a queue is declared (RabbitMQ), set by the app from task_queues
    queue_spec: Callable[[str], QueueSpec] = staticmethod(  # type: ignore[assignment]
        lambda name: QueueSpec(name, name, routing_key=name))

    def retrying(self, attempt: Callable[[], T], errors: tuple[type[BaseException], ...],
                 on_error: Callable[[], None]) -> T:
        """Run ``attempt``, retrying on ``errors`` as ``retry_policy`` says (Celery's
        ``max_retries`` / ``interval_start`` / ``interval_step`` / ``interval_max``)."""
        policy = self.retry_policy
        max_retries = 0 if policy is None else policy.get("max_retries", 3)
        interval = 0.0 if policy is None else float(policy.get("interval_start", 0))
        tries = 0
        while True:
            try:
                return attempt()
            except errors as exc:
                on_error()
                if max_retries is not None and tries >= max_retries:
                    raise
                tries += 1
                log.warning("publishing failed (%r); retry %d in %.1fs", exc, tries, interval)
                time.sleep(interval)
                assert policy is not None
                interval = min(interval + float(policy.get("interval_step", 0.2)),
                               float(policy.get("interval_max", 0.2)))

    @abstractmethod
    def publish(self, message: Message) -> None:
        """Put ``message`` on ``message.queue``; returns once the broker has it."""

    def publish_after(self, backend: Backend, records: Sequence[Record],
                      message: Message) -> None:
        """Write ``records`` (the task's "sent" history) to ``backend``, then publish.

        A broker that shares a store with the backend may do both in one transaction.
        """
        finish = backend.record_begin(records)  # the write travels while we publish
        try:
            self.publish(message)
        finally:
            finish()

    def broadcast(self, command: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Send a remote-control command to every worker (see ``celeriac.control``).  A
        broker without broadcasts does nothing: its workers learn of revokes from the
        result store's revoke record when they start."""

    def ping(self, timeout: float) -> None:  # noqa: B027 - a local store is always there
        """Connect once and let go; raises when the broker cannot be reached."""

    @abstractmethod
    def purge(self, queues: Sequence[str]) -> int:
        """Delete every waiting message in ``queues``; returns how many."""

    @abstractmethod
    def consumer(self, queues: Sequence[str], *, name: str, io: Executor) -> Consumer:
        """A consumer for one worker process (``name`` identifies it).  ``io`` is the
        process's thread for blocking calls; a consumer with blocking I/O uses it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections held by this process."""
