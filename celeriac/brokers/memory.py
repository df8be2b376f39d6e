"""``memory://``: queues inside one process, for tests and embedded use.

Producers and an in-process worker (``celeriac.testing.start_worker``) share the
queues of one URL.  Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor

from ..protocol import Message
from .base import Broker, Consumer, dead_letter_caps


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, deque[Message]] = {}
        #: messages set aside, the newest ``dead_letter_limit`` (as the other brokers)
        self.dead: deque[tuple[Message, str]] = deque()
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.tags = itertools.count(1)

    def notify(self) -> None:
        for waiter in list(self.waiters):
            loop, event = waiter
            if loop.is_closed():
                self.waiters.discard(waiter)
            else:
                loop.call_soon_threadsafe(event.set)


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _store_for(url: str) -> _Store:
    with _stores_lock:
        return _stores.setdefault(url, _Store())


class MemoryBroker(Broker):
    def __init__(self, url: str, transport_options: dict[str, object] | None = None) -> None:
        self.url = url
        self.store = _store_for(url)
        limit = dead_letter_caps(transport_options or {})[0] or None
        if self.store.dead.maxlen != limit:
            self.store.dead = deque(self.store.dead, maxlen=limit)

    def publish(self, message: Message) -> None:
        with self.store.lock:
            message.tag = next(self.store.tags)
            self.store.queues.setdefault(message.queue, deque()).append(message)
        self.store.notify()

    def purge(self, queues: Sequence[str]) -> int:
        count = 0
        with self.store.lock:
            for q in queues:
                count += len(self.store.queues.pop(q, ()))
        return count

    def consumer(self, queues: Sequence[str], *, name: str, io: Executor) -> Consumer:
        return MemoryConsumer(self.store, list(queues))


class MemoryConsumer(Consumer):
    cancel_safe = True  # get() takes messages in one synchronous step

    def __init__(self, store: _Store, queues: list[str]) -> None:
        self.store = store
        self.queues = queues
        self.held: dict[int, Message] = {}

    def _take(self, limit: int) -> list[Message]:
        taken: list[Message] = []
        with self.store.lock:
            for q in self.queues:
                dq = self.store.queues.get(q)
                while dq and len(taken) < limit:
                    taken.append(dq.popleft())
        for m in taken:
            self.held[m.tag] = m
        return taken

    async def get(self, limit: int, timeout: float) -> list[Message]:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        self.store.waiters.add(waiter)
        try:
            taken = self._take(limit)
            if not taken:
                try:
                    await asyncio.wait_for(event.wait(), timeout)
                except TimeoutError:
                    return []
                taken = self._take(limit)
            return taken
        finally:
            self.store.waiters.discard(waiter)

    async def ack(self, messages: Sequence[Message]) -> None:
        for m in messages:
            self.held.pop(m.tag, None)

    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        self.held.pop(message.tag, None)
        with self.store.lock:
            if requeue:
                message.redelivered = True
                _put_back(self.store.queues.setdefault(message.queue, deque()), message)
            else:
                self.store.dead.append((message, reason))
        self.store.notify()

    async def close(self) -> None:
        with self.store.lock:
            for m in self.held.values():
                m.redelivered = True
                _put_back(self.store.queues.setdefault(m.queue, deque()), m)
        self.held.clear()
        self.store.notify()


def _put_back(queue: deque[Message], message: Message) -> None:
    """Return a message to its place: queues stay in publish (tag) order."""
    for i, waiting in enumerate(queue):
        if waiting.tag > message.tag:
            queue.insert(i, message)
            return
    queue.append(message)
