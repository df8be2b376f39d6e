"""``amqp://`` / ``pyamqp://``: RabbitMQ, declared and published to exactly as Celery does.

Entities (the same as a Celery 5.7 worker declares, so either can come first)::

    exchange <queue>   direct, durable            (Celery's task_default_exchange)
    queue    <queue>   durable, no arguments      bound to the exchange with key <queue>
    queue    celeriac.dead_letters   durable      messages set aside, with x-celeriac-reason;
                                                  each expires after dead_letter_max_age
    exchange+queue celeriac.delay.<n>  fanout / x-message-ttl 2**n s: parked (ETA) messages

Task messages go to the default exchange ``''`` with routing key ``<queue>``, persistent
(``delivery_mode=2``), the Celery headers as AMQP headers and the body as its serializer
wrote it (no base64), as Celery publishes them.

Clients: the worker consumes with aio-pika (asyncio, reconnects by itself); ``delay()``
publishes with py-amqp, a synchronous client (the one Celery itself uses), with publisher
confirms, so ``delay()`` returns once RabbitMQ has the message
(``broker_transport_options={'confirm_publish': False}``, kombu's option, turns them off:
faster, and as safe as Celery's default, which does not wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import amqp
from aio_pika.abc import AbstractIncomingMessage

from ..protocol import CONTROL_EXCHANGE, Message, control_command, control_message
from .base import DECODE_ERROR, Broker, Consumer, dead_letter_caps, undecodable

log = logging.getLogger("celeriac.broker")

DEAD_LETTERS = "celeriac.dead_letters"
#: Delay levels: queue ``celeriac.delay.<n>`` keeps a message 2**n seconds (up to 2**27 s,
#: about four years), then dead-letters it back to the queue it was meant for.
DELAY_LEVELS = 28
_DEATH_HEADERS = ("x-death", "x-first-death-exchange", "x-first-death-queue",
                  "x-first-death-reason", "x-last-death-exchange", "x-last-death-queue",
                  "x-last-death-reason")


#: What a lost (or dropped) producer connection raises.
_LOST = (OSError, amqp.exceptions.RecoverableConnectionError)
_frames_guarded = False


def _guard_header_frames() -> None:
    """Let a message whose headers nest deeper than Python's recursion limit arrive.

    pamqp decodes nested header tables recursively; on such a message the connection's
    frame reader would fail, the connection drop, and RabbitMQ deliver the message again,
    for ever, while every message around it was delivered again too.  A header frame
    that hits the limit is decoded once more with room for its depth (bounded by the
    frame's size: each level takes at least five bytes); the worker then finds the
    headers unusable and sets that one message aside."""
    global _frames_guarded
    if _frames_guarded:
        return
    import pamqp.frame

    original = pamqp.frame._unmarshal_header_frame

    def unmarshal(frame_data: bytes) -> Any:
        try:
            return original(frame_data)
        except RecursionError:
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(limit + 4 * len(frame_data))
            try:
                return original(frame_data)
            finally:
                sys.setrecursionlimit(limit)

    pamqp.frame._unmarshal_header_frame = unmarshal
    _frames_guarded = True


def _parse(url: str) -> dict[str, Any]:
    """kombu's reading of an AMQP URL: ``amqp://user:pass@host:port/vhost`` (``//`` = ``/``)."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if parts.path and parts.path != "/" else "/"
    return {
        "host": f"{parts.hostname or 'localhost'}:{parts.port or 5672}",
        "userid": unquote(parts.username or "guest"),
        "password": unquote(parts.password or "guest"),
        "virtual_host": vhost or "/",
    }


def _aio_url(url: str) -> str:
    p = _parse(url)
    from urllib.parse import quote

    return (f"amqp://{quote(p['userid'], safe='')}:{quote(p['password'], safe='')}@"
            f"{p['host']}/{quote(p['virtual_host'], safe='')}")


class AMQPBroker(Broker):
    def __init__(self, url: str, transport_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.options = transport_options or {}
        self.dead_letter_limit, self.dead_letter_max_age = dead_letter_caps(self.options)
        self._local = threading.local()

    # -- producer side (synchronous, py-amqp) --------------------------------------------

    def _channel(self) -> Any:
        state = self._local
        if getattr(state, "pid", None) != os.getpid() or state.channel is None:
            if getattr(state, "pid", None) == os.getpid() and state.conn is not None:
                with contextlib.suppress(Exception):  # a lost one: release its socket
                    state.conn.collect()
            conn = amqp.Connection(**_parse(self.url),
                                   confirm_publish=bool(self.options.get("confirm_publish", True)))
            conn.connect()
            state.conn, state.channel, state.pid = conn, conn.channel(), os.getpid()
            state.declared = set()
        return state.channel

    def _declare(self, channel: Any, queue: str) -> None:
        if queue in self._local.declared:
            return
        spec = self.queue_spec(queue)
        channel.exchange_declare(spec.exchange, spec.exchange_type, durable=True,
                                 auto_delete=False)
        channel.queue_declare(queue, durable=True, auto_delete=False,
                              arguments=spec.arguments or None)
        channel.queue_bind(queue, spec.exchange, spec.routing_key)
        self._local.declared.add(queue)

    def _on_channel(self, step: Callable[[Any], None]) -> None:
        """Run ``step`` on this thread's channel, retrying as ``retry_policy`` says.

        A connection that RabbitMQ dropped while it was idle (a broker restart) is only
        found out when it is used: then ``step`` runs once more at once on a new
        connection, which is not counted as a retry (without it, the first publish after
        every restart would fail when retries are off)."""
        def attempt() -> None:
            state = self._local
            fresh = getattr(state, "pid", None) != os.getpid() or state.channel is None
            try:
                step(self._channel())
            except _LOST:
                if fresh:
                    raise
                log.info("the connection to RabbitMQ was lost; publishing on a new one")
                self._local.channel = None
                step(self._channel())

        def reconnect() -> None:
            self._local.channel = None

        self.retrying(attempt, _LOST, reconnect)

    def publish(self, message: Message) -> None:
        def step(channel: Any) -> None:
            self._declare(channel, message.queue)
            channel.basic_publish(_to_amqp(message), exchange="", routing_key=message.queue)

        self._on_channel(step)

    def broadcast(self, command: dict[str, Any]) -> None:
        def step(channel: Any) -> None:
            if CONTROL_EXCHANGE not in self._local.declared:
                channel.exchange_declare(CONTROL_EXCHANGE, "fanout", durable=False,
                                         auto_delete=False)
                self._local.declared.add(CONTROL_EXCHANGE)
            channel.basic_publish(_to_amqp(control_message(command)),
                                  exchange=CONTROL_EXCHANGE, routing_key="")

        self._on_channel(step)

    def ping(self, timeout: float) -> None:
        conn = amqp.Connection(**_parse(self.url), connect_timeout=timeout)
        conn.connect()
        conn.close()

    def purge(self, queues: Sequence[str]) -> int:
        """Waiting messages and those parked for an ETA (first: a parked message that
        comes due meanwhile lands in a queue still to be purged)."""
        total = self._purge_parked(set(queues))
        channel = self._channel()
        for q in queues:
            self._declare(channel, q)
            total += channel.queue_purge(q) or 0
        return total

    def _purge_parked(self, queues: set[str]) -> int:
        """Drop the messages for ``queues`` from the delay queues, which hold every
        queue's parked messages together: each delay queue's messages are taken without
        an ack, those routed to ``queues`` acked, and the channel closed, which hands
        the others back in their places, their time waited so far kept."""
        conn = amqp.Connection(**_parse(self.url))
        conn.connect()
        dropped = 0
        try:
            for level in range(DELAY_LEVELS):
                name = f"celeriac.delay.{level}"
                channel = conn.channel()
                try:
                    channel.queue_declare(name, passive=True)
                except amqp.exceptions.NotFound:
                    continue  # never used (the server closed the channel)
                while (m := channel.basic_get(name, no_ack=False)) is not None:
                    if m.delivery_info.get("routing_key") in queues:
                        channel.basic_ack(m.delivery_tag)
                        dropped += 1
                channel.close()
        finally:
            conn.close()
        return dropped

    def consumer(self, queues: Sequence[str], *, name: str, io: Executor) -> Consumer:
        return AMQPConsumer(self, list(queues), name)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            with contextlib.suppress(Exception):
                conn.close()
        self._local.channel = None


def _to_amqp(message: Message) -> amqp.Message:
    props = message.properties
    extra: dict[str, Any] = {}
    if props.get("expiration") is not None:
        extra["expiration"] = str(props["expiration"])
    return amqp.Message(
        message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        application_headers=message.headers,
        delivery_mode=props.get("delivery_mode", 2),
        priority=props.get("priority") or 0,
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to") or None,
        **extra,
    )


def _from_aio(incoming: AbstractIncomingMessage, queue: str) -> Message:
    try:
        headers = {k: _plain(v) for k, v in (incoming.headers or {}).items()}
    except Exception as exc:  # RecursionError, or anything: set aside on its own
        message = undecodable(incoming.body, queue, exc)
        message.properties["correlation_id"] = incoming.correlation_id  # its task id
        message.tag = incoming
        return message
    props: dict[str, Any] = {
        "correlation_id": incoming.correlation_id,
        "reply_to": incoming.reply_to,
        "delivery_mode": int(incoming.delivery_mode or 2),
        "priority": incoming.priority or 0,
        "delivery_info": {"exchange": incoming.exchange or "",
                          "routing_key": incoming.routing_key or queue},
    }
    if incoming.expiration is not None:
        props["expiration"] = incoming.expiration
    message = Message(headers, incoming.body, incoming.content_type or "",
                      incoming.content_encoding or "", props, queue=queue)
    message.tag = incoming
    message.redelivered = bool(incoming.redelivered)
    return message


async def _settled(step: Awaitable[Any], what: str) -> None:
    """A step on a delivery's channel, which may have died with its connection: then
    RabbitMQ hands the delivery out again by itself, so the step is logged and skipped
    (never waited on for more than a few seconds)."""
    try:
        await asyncio.wait_for(step, 5.0)
    except Exception as exc:
        log.warning("could not %s (%r): the channel is gone; RabbitMQ delivers the "
                    "message again", what, exc)


def _plain(value: Any) -> Any:
    """AMQP header values as JSON would give them (bytes to str, nested too)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class AMQPConsumer(Consumer):
    cancel_safe = True  # deliveries wait in a local queue; nothing is lost by not taking
    acks_are_frames = True

    def __init__(self, broker: AMQPBroker, queues: list[str], name: str) -> None:
        self.broker = broker
        self.queues = queues
        self.name = name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._prefetch = 0
        self._queues: list[aio_pika.abc.AbstractQueue] = []
        self._tags: list[str] = []
        self._switching = asyncio.Lock()  # pause() and resume() one at a time
        self._raw: Any = None  # the channel's aiormq channel, for acks
        #: delivery tags of the current channel not acked or rejected yet
        self._unsettled: set[int] = set()
        self._delays: dict[int, aio_pika.abc.AbstractExchange] = {}  # declared delay levels

    @property
    def _connected(self) -> bool:
        return (self._connection is not None and not self._connection.is_closed
                and self._channel is not None and not self._channel.is_closed)

    async def _connect(self, prefetch: int) -> None:
        """(Re)connect, declare and consume.  Deliveries of a lost connection that were
        not taken are dropped here: RabbitMQ gives them out again."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = self._channel = None
        _guard_header_frames()
        self._inbox = asyncio.Queue()
        self._queues, self._tags = [], []
        self._connection = await aio_pika.connect(_aio_url(self.broker.url),
                                                  client_properties={
                                                      "connection_name": self.name})
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        self._channel = channel
        self._raw = await channel.get_underlay_channel()
        self._unsettled = set()
        self._delays = {}
        await channel.declare_queue(DEAD_LETTERS, durable=True)
        for q in self.queues:
            spec = self.broker.queue_spec(q)
            exchange = await channel.declare_exchange(
                spec.exchange, aio_pika.ExchangeType(spec.exchange_type), durable=True)
            queue = await channel.declare_queue(q, durable=True,
                                                arguments=spec.arguments or None)
            await queue.bind(exchange, routing_key=spec.routing_key)
            self._queues.append(queue)
        await self.resume()

    async def control(self, handle: Callable[[dict[str, Any]], None],
                      ready: Callable[[], None]) -> None:
        """A queue of this process's own bound to ``celery.pidbox`` (declared as Celery
        declares the exchange, and its queues: exclusive, auto-delete, x-expires 10 s,
        x-message-ttl 300 s), on a connection of its own, consumed without acks."""
        connection = await aio_pika.connect(_aio_url(self.broker.url), client_properties={
            "connection_name": f"{self.name} control"})
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=False,
                auto_delete=False)
            queue = await channel.declare_queue(
                f"{self.name}.celeriac.pidbox", exclusive=True, auto_delete=True,
                arguments={"x-expires": 10000, "x-message-ttl": 300000})
            await queue.bind(exchange, routing_key="")

            async def receive(incoming: AbstractIncomingMessage) -> None:
                try:
                    handle(control_command(_from_aio(incoming, queue.name)))
                except Exception:
                    log.exception("remote-control message %r failed", incoming.body[:200])

            await queue.consume(receive, no_ack=True)
            ready()
            while not channel.is_closed:
                await asyncio.sleep(1.0)
            raise ConnectionError("the control channel was closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def resume(self) -> None:
        async with self._switching:
            if self._tags or not self._connected:
                return
            for queue in self._queues:
                self._tags.append(await queue.consume(self._receiver(queue.name)))

    def _receiver(self, name: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def receive(incoming: AbstractIncomingMessage) -> None:
            if _on(incoming, self._raw) and incoming.delivery_tag is not None:
                self._unsettled.add(incoming.delivery_tag)
            self._inbox.put_nowait(_from_aio(incoming, name))

        return receive

    def holds(self, message: Message) -> bool:
        return message.tag is not None and _on(message.tag, self._raw) and self._connected

    async def park(self, message: Message, due: float) -> bool:
        """Send a message whose ETA is far off through a delay queue.

        RabbitMQ has no delayed delivery of its own (without a plugin), so celeriac
        uses fixed-TTL queues: ``celeriac.delay.<n>`` holds every message 2**n seconds,
        the largest such time not past the ETA, then dead-letters it to the default
        exchange with its routing key, the queue it came from.  A worker that gets it
        back parks it again for what remains (one hop per binary digit of the delay,
        about a dozen for an hour) and, within a second of its ETA, waits for it.  One
        TTL per queue keeps each queue first-in first-out, so nothing waits behind a
        later message.  The copy is published with a confirm before this delivery is
        acked: nothing is lost, nothing waits in the worker's memory, and a Celery
        worker sharing the queue sees an ordinary message with an ``eta`` header."""
        incoming = message.tag
        channel = self._channel
        if channel is None or incoming is None or not _on(incoming, self._raw):
            return False
        remaining = max(due - time.time(), 1.0)
        level = min(int(math.log2(remaining)), DELAY_LEVELS - 1)
        exchange = await self._delay_exchange(level)
        headers = {k: v for k, v in (incoming.headers or {}).items()
                   if k not in _DEATH_HEADERS}
        await exchange.publish(aio_pika.Message(
            incoming.body, headers=headers, content_type=incoming.content_type,
            content_encoding=incoming.content_encoding, delivery_mode=2,
            priority=incoming.priority, correlation_id=incoming.correlation_id,
            reply_to=incoming.reply_to), routing_key=message.queue)
        await self.ack([message])
        return True

    async def _delay_exchange(self, level: int) -> aio_pika.abc.AbstractExchange:
        exchange = self._delays.get(level)
        if exchange is None:
            assert self._channel is not None
            name = f"celeriac.delay.{level}"
            exchange = await self._channel.declare_exchange(
                name, aio_pika.ExchangeType.FANOUT, durable=True)
            queue = await self._channel.declare_queue(name, durable=True, arguments={
                "x-message-ttl": 1000 * 2 ** level, "x-dead-letter-exchange": ""})
            await queue.bind(exchange)
            self._delays[level] = exchange
        return exchange

    async def pause(self) -> None:
        """Stop deliveries and hand what was pushed but not taken back to RabbitMQ,
        which gives it to a consumer that is free."""
        async with self._switching:
            tags, self._tags = self._tags, []
            if self._connected:
                for queue, tag in zip(self._queues, tags, strict=False):
                    await _settled(queue.cancel(tag), "cancel a consumer")
        while not self._inbox.empty():
            await self._hand_back(self._inbox.get_nowait().tag)

    async def _hand_back(self, incoming: AbstractIncomingMessage) -> None:
        self._unsettled.discard(incoming.delivery_tag or 0)
        await _settled(incoming.reject(requeue=True), "hand back")

    async def get(self, limit: int, timeout: float) -> list[Message]:
        if not self._connected:
            if self._connection is not None:
                log.warning("connection to RabbitMQ lost; reconnecting")
            # RabbitMQ holds back what is beyond this: the process's prefetch
            self._prefetch = max(self._prefetch, limit)
            await self._connect(self._prefetch)  # raises while RabbitMQ is away: the
            # worker retries with backoff
        try:
            first = await asyncio.wait_for(self._inbox.get(), timeout)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < limit and not self._inbox.empty():
            out.append(self._inbox.get_nowait())
        return out

    async def ack(self, messages: Sequence[Message]) -> None:
        """Ack with as few frames as RabbitMQ allows: one ``multiple`` ack covers every
        tag below the lowest delivery still unsettled, the rest go one by one.  Acks are
        one-way frames, queued on the connection without waiting for the write."""
        raw = self._raw
        tags = sorted(m.tag.delivery_tag for m in messages if _on(m.tag, raw))
        if len(tags) < len(messages):
            log.warning("could not ack %d message(s): their channel is gone; RabbitMQ "
                        "delivers them again", len(messages) - len(tags))
        if not tags:
            return
        self._unsettled.difference_update(tags)
        floor = min(self._unsettled, default=tags[-1] + 1)
        covered = sum(1 for t in tags if t < floor)
        try:
            async with asyncio.timeout(5.0):  # a channel dying under us may never take it
                if covered:
                    await raw.basic_ack(tags[covered - 1], multiple=covered > 1, wait=False)
                for t in tags[covered:]:
                    await raw.basic_ack(t, wait=False)
        except Exception as exc:
            log.warning("could not ack %d message(s) (%r): the channel is gone; RabbitMQ "
                        "delivers them again", len(tags), exc)

    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        incoming = message.tag
        if requeue:
            await self._hand_back(incoming)
            return
        self._unsettled.discard(incoming.delivery_tag or 0)
        assert self._channel is not None
        # headers that could not be read are not sent again
        headers = {} if DECODE_ERROR in message.properties else dict(incoming.headers or {})
        headers["x-celeriac-reason"] = reason
        headers["x-celeriac-queue"] = message.queue
        max_age = self.broker.dead_letter_max_age
        await self._channel.default_exchange.publish(
            aio_pika.Message(incoming.body, headers=headers,
                             content_type=incoming.content_type,
                             content_encoding=incoming.content_encoding,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             expiration=max_age or None),
            routing_key=DEAD_LETTERS)
        await incoming.ack()

    async def close(self) -> None:
        if self._connection is not None:
            # closing the channel hands every unacked delivery back to RabbitMQ
            await self._connection.close()
            self._connection = None


def _on(incoming: AbstractIncomingMessage, channel: Any) -> bool:
    """Whether a delivery came on ``channel`` and it is still open (a delivery whose
    channel closed cannot be settled: RabbitMQ delivers it again)."""
    try:
        return incoming.channel is channel
    except aiormq.exceptions.ChannelInvalidStateError:
        return False
