"""``redis://`` / ``rediss://``: the broker laid out exactly as kombu's Redis transport,
so Celery and celeriac producers and workers can share one queue.

Layout (inspect with ``redis-cli``)::

    <queue>                  LIST of kombu envelopes (JSON, base64 body); LPUSH in, RPOP out
    <queue>\\x06\\x16<3|6|9>   the same for priorities 3-5, 6-8 and 9 (consumed after <queue>)
    unacked                  HASH  delivery_tag -> JSON [envelope, exchange, routing_key]
    unacked_index            ZSET  delivery_tag scored by when it was taken (or last renewed)
    unacked_mutex            STRING lock held while expired entries are put back
    celeriac.unacked_node    HASH  delivery_tag -> "<worker node id>/<pid>" holding it (celeriac's)
    _kombu.binding.<queue>   SET   "<routing_key>\\x06\\x16\\x06\\x16<queue>" (declared by workers)
    celeriac.dead_letters    LIST  messages set aside: JSON {queue, reason, failed_at, payload},
                             newest first, capped (``dead_letter_limit``/``dead_letter_max_age``)
    celeriac.delayed\x06\x16<list>  ZSET  messages parked until their ETA, scored by it

A consumer takes a batch with one Lua script that pops the messages and enters them in
``unacked``/``unacked_index`` atomically; when nothing is waiting it blocks on BRPOP (no
polling) and enters what it got the same way.  An ack removes the entries.  While it holds
a message it renews the entry's score, so a long task is not redelivered; an entry older
than ``visibility_timeout`` (default 3600 s, kombu's) belongs to a consumer that died and
is put back on its queue by whichever worker — Celery's or celeriac's — checks first.

A celeriac consumer that serves a worker node with heartbeats also notes, in the same
atomic step as the take, which node and process hold each delivery
(``celeriac.unacked_node``); the entry goes with the ack.  When the heartbeats show the
node is lost, the worker that takes it over puts every message the node held back on
its queue at once (:meth:`RedisBroker.give_back_node`), and when one process of a node
dies its supervisor does the same for that process, instead of leaving them to the
visibility timeout.
Kombu neither reads nor writes that hash, so Celery workers sharing the queues see the
layout they expect.

Putting a message back (warm shutdown, a lost node, an expired entry) is one Lua script
that checks the ``unacked`` entry is still the one read and moves it in the same step,
so it never fails because other workers are taking and acking at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.backoff
import redis.retry

from ..protocol import (
    CONTROL_EXCHANGE,
    Message,
    control_command,
    control_message,
    decode_envelope,
    encode_envelope,
)
from .base import Broker, Consumer, dead_letter_caps, undecodable

log = logging.getLogger("celeriac.broker")

SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
UNACKED_MUTEX = "unacked_mutex"
UNACKED_NODE = "celeriac.unacked_node"
DEAD_LETTERS = "celeriac.dead_letters"
DEFAULT_VISIBILITY_TIMEOUT = 3600.0
#: How often a consumer puts back the messages of consumers that died (seconds).
RESTORE_EVERY = 60.0
#: How often a consumer looks for parked (ETA) messages that are due, at least (seconds).
RECHECK_PARKED = 1.0

# Pop up to ARGV[1] messages from KEYS[1..n-3] in order and enter each in the unacked
# hash and index (KEYS[n-2], KEYS[n-1]) in the same atomic step, and note the worker
# node ARGV[3] holding it in KEYS[n] (unless ARGV[3] is '').  A message that is not
# JSON is returned with an empty tag, for the worker to set aside.
_TAKE = """
local limit = tonumber(ARGV[1])
local now = ARGV[2]
local node = ARGV[3]
local nq = #KEYS - 3
local index, unacked, owners = KEYS[nq + 1], KEYS[nq + 2], KEYS[nq + 3]
local out = {}
local taken = 0
for i = 1, nq do
  while taken < limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    taken = taken + 1
    local ok, m = pcall(cjson.decode, item)
    local tag = ''
    if ok and type(m) == 'table' and type(m.properties) == 'table'
        and type(m.properties.delivery_tag) == 'string' then
      tag = m.properties.delivery_tag
      local info = m.properties.delivery_info
      local ex, rk = '', ''
      if type(info) == 'table' then
        if type(info.exchange) == 'string' then ex = info.exchange end
        if type(info.routing_key) == 'string' then rk = info.routing_key end
      end
      redis.call('ZADD', index, now, tag)
      redis.call('HSET', unacked, tag,
                 '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      if node ~= '' then redis.call('HSET', owners, tag, node) end
    end
    table.insert(out, KEYS[i])
    table.insert(out, item)
    table.insert(out, tag)
  end
end
return out
"""


# Move delayed messages that are due back to their lists.  KEYS: pairs of (delayed zset,
# list).  ARGV: now, most to move.  Returns how many moved and the next due time ('' if
# none).  RPUSH: consumers pop from the right, so a due message is the next one taken.
_MOVE_DUE = """
local moved, nextdue = 0, nil
for i = 1, #KEYS, 2 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[i], m)
    redis.call('RPUSH', KEYS[i + 1], m)
    moved = moved + 1
  end
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (nextdue == nil or tonumber(first[2]) < nextdue) then
    nextdue = tonumber(first[2])
  end
end
return {moved, nextdue and tostring(nextdue) or ''}
"""


# Keep the dead-letter list (KEYS[1]) within ARGV[n] entries and drop those set aside
# before ARGV[n+1] (epoch s); 0 means no limit.  Newest entries are on the left.
_TRIM_DEAD = """
local function trim_dead(key, limit, oldest)
  if limit > 0 then redis.call('LTRIM', key, 0, limit - 1) end
  if oldest > 0 then
    while true do
      local last = redis.call('LINDEX', key, -1)
      if not last then break end
      local ok, m = pcall(cjson.decode, last)
      if ok and type(m) == 'table' and type(m.failed_at) == 'number'
          and m.failed_at >= oldest then break end
      redis.call('RPOP', key)
    end
  end
end
"""

# Set a message aside: forget its unacked entry (tag ARGV[1], '' none; KEYS[1..3]:
# unacked, unacked_index, unacked_node), add the record ARGV[2] to the dead letters
# (KEYS[4]) and trim them (ARGV[3], ARGV[4]).
_DEAD_LETTER = _TRIM_DEAD + """
if ARGV[1] ~= '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('LPUSH', KEYS[4], ARGV[2])
trim_dead(KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""

# Put one held message back on its queue(s), atomically.  KEYS: unacked, unacked_index,
# unacked_node, dead letters, and the exchange's binding set ('' for the default
# exchange).  ARGV: tag, the unacked entry as the caller read it, the payload to push
# (marked redelivered), the priority suffix of the list, the routing key, the node that
# must hold it ('' any), then for an entry that cannot be read: the dead-letter record,
# limit, oldest.  Returns 1 when put back (or set aside), 0 when there was nothing to
# put back (gone, or held by another node now), -1 when the entry changed since it was
# read (read it again and retry).
_GIVE_BACK = _TRIM_DEAD + """
local tag = ARGV[1]
local entry = redis.call('HGET', KEYS[1], tag)
if not entry then
  redis.call('ZREM', KEYS[2], tag)
  if ARGV[6] == '' or redis.call('HGET', KEYS[3], tag) == ARGV[6] then
    redis.call('HDEL', KEYS[3], tag)
  end
  return 0
end
if entry ~= ARGV[2] then return -1 end
if ARGV[6] ~= '' and redis.call('HGET', KEYS[3], tag) ~= ARGV[6] then return 0 end
redis.call('HDEL', KEYS[1], tag)
redis.call('ZREM', KEYS[2], tag)
redis.call('HDEL', KEYS[3], tag)
if ARGV[3] == '' then
  redis.call('LPUSH', KEYS[4], ARGV[7])
  trim_dead(KEYS[4], tonumber(ARGV[8]), tonumber(ARGV[9]))
  return 1
end
local queues = {}
if KEYS[5] ~= '' then
  for _, member in ipairs(redis.call('SMEMBERS', KEYS[5])) do
    local rk, q = string.match(member, '^(.-)\\6\\22.-\\6\\22(.*)$')
    if rk == ARGV[5] then table.insert(queues, q) end
  end
end
if #queues == 0 then queues = {ARGV[5]} end
for _, q in ipairs(queues) do
  redis.call('RPUSH', q .. ARGV[4], ARGV[3])
end
return 1
"""


def delayed_key(list_key: str) -> str:
    """The sorted set of messages parked until their ETA, for one queue list."""
    return f"celeriac.delayed{SEP}{list_key}"


def sync_client(url: str) -> redis.Redis:
    """A client that retries a command once its connection was lost (3 times, backing off)."""
    return redis.Redis.from_url(
        url, retry=redis.retry.Retry(redis.backoff.ExponentialBackoff(cap=1.0, base=0.01), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def async_client(url: str) -> aioredis.Redis:
    """Like :func:`sync_client`; a command waits for one of its 100 connections to be
    free rather than failing (many held messages given back at once, for instance)."""
    from redis.asyncio.retry import Retry

    pool = aioredis.BlockingConnectionPool.from_url(
        url, retry=Retry(redis.backoff.ExponentialBackoff(cap=1.0, base=0.01), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError], max_connections=100,
        timeout=None)
    return aioredis.Redis.from_pool(pool)


def queue_key(queue: str, priority: int | None) -> str:
    """kombu's list for a priority: 0-2 -> queue, 3-5 -> queue\\x06\\x163, ..."""
    p = min(max(int(priority or 0), 0), 9)
    step = max(s for s in PRIORITY_STEPS if s <= p)
    return f"{queue}{SEP}{step}" if step else queue


def queue_of_key(key: str) -> str:
    return key.rsplit(SEP, 1)[0]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _restored(raw: dict[str, Any]) -> dict[str, Any]:
    """Mark an envelope as redelivered, as kombu does when it puts a message back."""
    raw.setdefault("headers", {})["redelivered"] = True
    props = raw.setdefault("properties", {})
    props.setdefault("delivery_info", {})["redelivered"] = True
    return raw


class RedisBroker(Broker):
    def __init__(self, url: str, transport_options: dict[str, Any] | None = None) -> None:
        self.url = url
        options = transport_options or {}
        self.visibility_timeout = float(
            options.get("visibility_timeout", DEFAULT_VISIBILITY_TIMEOUT))
        self.dead_letter_limit, self.dead_letter_max_age = dead_letter_caps(options)
        #: the worker node whose deliveries this process notes (see GivesBackLostNodes)
        self.node: str | None = None
        self._client: redis.Redis | None = None
        self._give_back_script: Any = None
        self._pid = 0

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            self._client = sync_client(self.url)
            self._give_back_script = self._client.register_script(_GIVE_BACK)
            self._pid = os.getpid()
        return self._client

    def dead_letter_record(self, queue: str, reason: str, payload: bytes) -> str:
        return json.dumps({"queue": queue, "reason": reason, "failed_at": time.time(),
                           "payload": payload.decode("utf-8", "replace")})

    def dead_letter_trim(self) -> list[float]:
        """The script arguments that keep the dead letters within their caps."""
        oldest = time.time() - self.dead_letter_max_age if self.dead_letter_max_age else 0
        return [self.dead_letter_limit, oldest]

    def give_back_call(self, tag: str, entry: bytes | str | None,
                       node: str) -> tuple[list[str], list[Any]]:
        """Keys and arguments of the _GIVE_BACK script for ``entry`` (as read from
        ``unacked``, None: gone).  An entry that cannot be read is set aside."""
        payload, suffix, binding, routing_key, dead = "", "", "", "", ""
        if entry is not None:
            try:
                raw, exchange, routing_key = json.loads(entry)
                if not (isinstance(exchange, str) and isinstance(routing_key, str)):
                    raise TypeError("exchange and routing key must be strings")
                suffix = queue_key("", (raw.get("properties") or {}).get("priority"))
                payload = json.dumps(_restored(raw))
                binding = f"_kombu.binding.{exchange}" if exchange else ""
            except Exception as exc:  # hostile or broken: never lost, never retried
                payload, suffix, binding, routing_key = "", "", "", ""
                dead = self.dead_letter_record(
                    "", f"unreadable unacked entry: {exc!r}"[:500],
                    entry if isinstance(entry, bytes) else entry.encode())
        keys = [UNACKED, UNACKED_INDEX, UNACKED_NODE, DEAD_LETTERS, binding]
        args = [tag, entry or b"", payload, suffix, routing_key, node, dead,
                *self.dead_letter_trim()]
        return keys, args

    def give_back(self, tag: str, node: str = "") -> int:
        """Put one held message back on its queue (only if ``node`` holds it, when
        given); retried until done, as other workers' takes and acks never block it."""
        client = self.client
        while True:
            keys, args = self.give_back_call(tag, client.hget(UNACKED, tag), node)
            done = int(self._give_back_script(keys=keys, args=args))
            if done >= 0:
                return done

    def give_back_node(self, node: str) -> int:
        """Put every message that worker node ``node`` (or one process of it,
        ``<node>/<pid>``) held back on its queue."""
        exact, prefix = node.encode(), f"{node}/".encode()
        held = [(_text(tag), _text(owner))
                for tag, owner in self.client.hscan_iter(UNACKED_NODE, count=1000)
                if owner == exact or owner.startswith(prefix)]
        return sum(self.give_back(tag, owner) for tag, owner in held)

    def publish(self, message: Message) -> None:
        key = queue_key(message.queue, message.properties.get("priority"))
        payload = encode_envelope(message)
        self.retrying(lambda: self.client.lpush(key, payload),
                      (redis.ConnectionError, redis.TimeoutError), lambda: None)

    def publish_after(self, backend: Any, records: Sequence[Any], message: Message) -> None:
        from ..backends.redis import RedisBackend

        if not (isinstance(backend, RedisBackend) and backend.url == self.url):
            super().publish_after(backend, records, message)
            return
        key = queue_key(message.queue, message.properties.get("priority"))
        payload = encode_envelope(message)

        def attempt() -> None:  # one round trip; MULTI keeps the history ahead of the message
            with self.client.pipeline(transaction=True) as pipe:
                backend.queue_history(pipe, records)
                pipe.lpush(key, payload)
                pipe.execute()

        self.retrying(attempt, (redis.ConnectionError, redis.TimeoutError), lambda: None)

    def ping(self, timeout: float) -> None:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=timeout,
                                      socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()

    def purge(self, queues: Sequence[str]) -> int:
        """Waiting messages and those parked for an ETA, in one transaction."""
        lists = [queue_key(q, p) for q in queues for p in PRIORITY_STEPS]
        keys = [*lists, *(delayed_key(k) for k in lists)]
        with self.client.pipeline() as pipe:
            for k in lists:
                pipe.llen(k)
            for k in lists:
                pipe.zcard(delayed_key(k))
            pipe.delete(*keys)
            counts = pipe.execute()
        return int(sum(counts[:-1]))

    def consumer(self, queues: Sequence[str], *, name: str, io: Executor) -> Consumer:
        owner = f"{self.node}/{os.getpid()}" if self.node else None
        return RedisConsumer(self, list(queues), name, owner)

    @property
    def control_channel(self) -> str:
        """kombu's fanout topic for Celery's control exchange: ``/<db>.celery.pidbox``."""
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        return f"/{db}.{CONTROL_EXCHANGE}"

    def broadcast(self, command: dict[str, Any]) -> None:
        payload = encode_envelope(control_message(command))
        self.retrying(lambda: self.client.publish(self.control_channel, payload),
                      (redis.ConnectionError, redis.TimeoutError), lambda: None)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.client.lrange(DEAD_LETTERS, 0, -1)]

    def close(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


class RedisConsumer(Consumer):
    def __init__(self, broker: RedisBroker, queues: list[str], name: str,
                 node: str | None = None) -> None:
        self.broker = broker
        self.queues = queues
        self.name = name
        #: "<node>/<pid>", noted with each delivery taken ('' not noted)
        self.node = node or ""
        self.keys = [queue_key(q, p) for p in PRIORITY_STEPS for q in queues]
        self.visibility_timeout = broker.visibility_timeout
        self._client: aioredis.Redis | None = None
        self._take_script: Any = None
        self._held: dict[str, Message] = {}
        self._background: list[asyncio.Task[None]] = []
        self._move_script: Any = None
        self._give_back_script: Any = None
        self._dead_script: Any = None
        self._next_due = 0.0  # when to look for parked messages that are due next

    async def _connect(self) -> aioredis.Redis:
        if self._client is None:
            client = async_client(self.broker.url)
            async with client.pipeline(transaction=False) as pipe:
                for q in self.queues:  # the binding a Celery worker declares for its queue
                    pipe.sadd(f"_kombu.binding.{q}", SEP.join([q, "", q]))
                await pipe.execute()
            self._take_script = client.register_script(_TAKE)
            self._move_script = client.register_script(_MOVE_DUE)
            self._give_back_script = client.register_script(_GIVE_BACK)
            self._dead_script = client.register_script(_DEAD_LETTER)
            self._client = client
            loop = asyncio.get_running_loop()
            self._background = [loop.create_task(self._renew_forever()),
                                loop.create_task(self._restore_forever())]
        return self._client

    async def control(self, handle: Callable[[dict[str, Any]], None],
                      ready: Callable[[], None]) -> None:
        """PSUBSCRIBE to the control topic, as a Celery worker does (no wildcard)."""
        client = async_client(self.broker.url)
        pubsub = client.pubsub()
        try:
            await pubsub.psubscribe(self.broker.control_channel)
            ready()
            while True:
                event = await pubsub.get_message(ignore_subscribe_messages=True,
                                                 timeout=None)
                if event is None or event.get("type") != "pmessage":
                    continue
                try:
                    handle(control_command(decode_envelope(event["data"], "")))
                except Exception:
                    log.exception("remote-control message %r failed", event["data"][:200])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    async def get(self, limit: int, timeout: float) -> list[Message]:
        client = await self._connect()
        if time.time() >= self._next_due:
            await self._move_due()
        messages = await self._take(limit)
        if messages:
            return messages
        timeout = min(timeout, self._next_due - time.time())
        got = await client.brpop(self.keys, timeout=max(timeout, 0.01))
        if not got:
            return []
        key, raw = got
        # start on it at once; the next get() takes whatever else is waiting
        return [await self._enter(_text(key), raw if isinstance(raw, bytes) else raw.encode())]

    async def _move_due(self) -> None:
        """Parked messages that are due go back to the front of their lists.  Every
        consumer looks at least every RECHECK_PARKED seconds, and at the earliest due
        time it knows of."""
        keys = [k for list_key in self.keys for k in (delayed_key(list_key), list_key)]
        moved, nextdue = await self._move_script(keys=keys, args=[time.time(), 1000])
        now = time.time()
        if int(moved) >= 1000:
            self._next_due = now  # more are due: move the next batch on the next get()
        else:
            due = float(nextdue) if nextdue else now + RECHECK_PARKED
            self._next_due = min(due, now + RECHECK_PARKED)

    async def park(self, message: Message, due: float) -> bool:
        """Move the message from the unacked bookkeeping into its list's sorted set of
        delayed messages, scored by ``due``, in one transaction: it is then neither
        held by this worker (no visibility timeout can hand it out again, kombu#337)
        nor kept in its memory."""
        tag = message.tag
        if not tag or message.raw is None or self._client is None:
            return False
        key = queue_key(message.queue, message.properties.get("priority"))
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(delayed_key(key), {message.raw: due})
            self._forget(pipe, [tag])
            await pipe.execute()
        self._held.pop(tag, None)
        self._next_due = min(self._next_due, due)
        return True

    async def _take(self, limit: int) -> list[Message]:
        out = await self._take_script(keys=[*self.keys, UNACKED_INDEX, UNACKED, UNACKED_NODE],
                                      args=[limit, time.time(), self.node])
        messages = []
        for i in range(0, len(out), 3):
            key, raw, tag = out[i].decode(), out[i + 1], out[i + 2].decode()
            messages.append(self._message(key, raw, tag))
        return messages

    async def _enter(self, key: str, raw: bytes) -> Message:
        """Enter a message taken by BRPOP in the unacked bookkeeping (as kombu does)."""
        message = self._message(key, raw, "")
        tag = message.properties.get("delivery_tag")
        if isinstance(tag, str) and tag:
            info = message.properties.get("delivery_info") or {}
            entry = "[" + raw.decode() + "," + json.dumps(info.get("exchange") or "") + "," \
                + json.dumps(info.get("routing_key") or "") + "]"
            assert self._client is not None
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zadd(UNACKED_INDEX, {tag: time.time()})
                pipe.hset(UNACKED, tag, entry)
                if self.node:
                    pipe.hset(UNACKED_NODE, tag, self.node)
                await pipe.execute()
            message.tag = tag
            self._held[tag] = message
        return message

    def _message(self, key: str, raw: bytes, tag: str) -> Message:
        queue = queue_of_key(key)
        try:
            message = decode_envelope(raw, queue)
        except Exception as exc:  # anything (even RecursionError): this one is set aside
            message = undecodable(raw, queue, exc)
        message.raw = raw
        message.redelivered = bool((message.properties.get("delivery_info") or {}).get(
            "redelivered") or message.headers.get("redelivered"))
        if tag:
            message.tag = tag
            self._held[tag] = message
        return message

    async def settle(self, backend: Any, records: Sequence[Any], acks: Sequence[Message],
                     io: Executor, roster: Any = None) -> None:
        from ..backends.redis import RedisBackend

        if not (isinstance(backend, RedisBackend) and backend.url == self.broker.url
                and backend.scripted):
            await super().settle(backend, records, acks, io, roster)
            return
        client = await self._connect()
        tags = [m.tag for m in acks if m.tag]
        async with client.pipeline(transaction=False) as pipe:  # one round trip for all
            skip = backend.queue_records(pipe, records, roster)
            if tags:
                self._forget(pipe, tags)
            try:
                backend.applied(records, await pipe.execute(raise_on_error=False), skip)
            except redis.exceptions.NoScriptError:
                backend.load_script()
                raise
        for t in tags:
            self._held.pop(t, None)

    def _forget(self, pipe: Any, tags: Sequence[str]) -> None:
        """Queue on ``pipe`` what drops these deliveries from kombu's unacked hash and
        index, and from the owner nodes' hash."""
        pipe.zrem(UNACKED_INDEX, *tags)
        pipe.hdel(UNACKED, *tags)
        if self.node:
            pipe.hdel(UNACKED_NODE, *tags)

    async def ack(self, messages: Sequence[Message]) -> None:
        tags = [m.tag for m in messages if m.tag]
        if not tags:
            return
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            self._forget(pipe, tags)
            await pipe.execute()
        for t in tags:
            self._held.pop(t, None)

    async def reject(self, message: Message, *, requeue: bool, reason: str = "") -> None:
        client = await self._connect()
        raw = message.raw or b""
        if requeue:  # back to the front: it is the next one taken
            async with client.pipeline(transaction=True) as pipe:
                if message.tag:
                    self._forget(pipe, [message.tag])
                payload = json.dumps(_restored(json.loads(raw)))
                pipe.rpush(queue_key(message.queue, message.properties.get("priority")), payload)
                await pipe.execute()
        else:
            record = self.broker.dead_letter_record(message.queue, reason, raw)
            await self._dead_script(
                keys=[UNACKED, UNACKED_INDEX, UNACKED_NODE, DEAD_LETTERS],
                args=[message.tag or "", record, *self.broker.dead_letter_trim()])
        if message.tag:
            self._held.pop(message.tag, None)

    async def _renew_forever(self) -> None:
        """Keep the entries of held messages fresh, so they are not taken for a dead
        consumer's and redelivered while a long task runs (kombu#337)."""
        interval = min(self.visibility_timeout / 3, 60.0)
        while True:
            await asyncio.sleep(interval)
            if self._held and self._client is not None:
                now = time.time()
                with contextlib.suppress(redis.RedisError):
                    await self._client.zadd(UNACKED_INDEX, dict.fromkeys(self._held, now),
                                            xx=True)

    async def _restore_forever(self) -> None:
        while True:
            with contextlib.suppress(redis.RedisError):  # down: the next round tries again
                await self.restore_expired()
            await asyncio.sleep(min(RESTORE_EVERY, self.visibility_timeout / 2))

    async def restore_expired(self) -> int:
        """Put back messages whose consumer stopped renewing them (it died)."""
        client = await self._connect()
        token = os.urandom(8).hex()
        if not await client.set(UNACKED_MUTEX, token, nx=True, ex=300):
            return 0  # another worker is doing it
        restored = 0
        try:
            ceiling = time.time() - self.visibility_timeout
            tags = await client.zrangebyscore(UNACKED_INDEX, "-inf", ceiling, start=0, num=100)
            for tag in tags:
                restored += await self._restore_tag(client, _text(tag))
        finally:
            if (await client.get(UNACKED_MUTEX)) == token.encode():
                await client.delete(UNACKED_MUTEX)
        return restored

    async def _restore_tag(self, client: aioredis.Redis, tag: str, node: str = "") -> int:
        """The async twin of :meth:`RedisBroker.give_back`: retried until done."""
        while True:
            keys, args = self.broker.give_back_call(tag, await client.hget(UNACKED, tag), node)
            done = int(await self._give_back_script(keys=keys, args=args))
            if done >= 0:
                return done

    async def close(self) -> None:
        for t in self._background:
            t.cancel()
        if self._client is None:
            return
        for tag in reversed(list(self._held)):  # not acked: back to the front, in order
            with contextlib.suppress(redis.RedisError):
                await self._restore_tag(self._client, tag, self.node)
        self._held.clear()
        await self._client.aclose()
        self._client = None
