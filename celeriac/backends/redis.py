"""``redis://`` / ``rediss://`` results, stored as Celery's Redis backend stores them.

Layout (inspect with ``redis-cli``)::

    celery-task-meta-<id>       STRING  the Celery meta (result_serializer bytes), TTL
                                        result_expires (default one day)
    celeriac-task-history-<id>  LIST    the history, one JSON object per entry, same TTL
    celeriac-revoked            ZSET    revoked task ids, each scored with the epoch
                                        second its revoke lapses
    celeriac-workers            ZSET    worker nodes, each scored with the epoch second
                                        of its last heartbeat
    celeriac-worker-tasks-<node> SET    the early-acked tasks the node is running

Every state write also PUBLISHes the meta on the channel named like the key, as Celery
does, so Celery's ``get()`` and celeriac's wake up at once.  The transition rule runs in
Redis: a Lua script reads the stored status, refuses to replace a ready one, and writes
meta, publish and history in the same atomic step (for a non-JSON result serializer,
where Lua cannot read the status, an optimistic WATCH/MULTI transaction does the same).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import redis

from .. import control, serialization, states
from ..brokers.redis import async_client, sync_client
from ..exceptions import TimeoutError
from ..protocol import check_task_id
from .base import Backend, Record, RecordsRefused, Roster

if TYPE_CHECKING:
    from ..app import Celeriac

META_PREFIX = "celery-task-meta-"
HISTORY_PREFIX = "celeriac-task-history-"
REVOKED_KEY = "celeriac-revoked"
WORKERS_KEY = "celeriac-workers"
ROSTER_PREFIX = "celeriac-worker-tasks-"
#: Ids per round trip when revoking many tasks at once.
CHUNK = 1000
#: Longest a waiter blocks on pub/sub before it reads the key again (missed messages).
WAIT_RECHECK = 1.0

#: Error replies that pass by themselves (the others refuse the record for good).
TRANSIENT_REPLIES = (redis.exceptions.NoScriptError, redis.exceptions.ReadOnlyError,
                     redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                     redis.exceptions.AskError)
TRANSIENT_PREFIXES = ("BUSY", "LOADING", "MISCONF", "MASTERDOWN", "NOREPLICAS")

_READY = ", ".join(f"'{s}'" for s in sorted(states.READY_STATES))
# KEYS: meta, history.  ARGV: payload, history entry, ttl seconds (0: none).  A key of
# the wrong type fails the GET or the RPUSH, before anything is written.
_SET_STATE = f"""
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' then
    local ready = {{}}
    for _, s in ipairs({{{_READY}}}) do ready[s] = true end
    if ready[meta.status] then return 0 end
  end
end
local ttl = tonumber(ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


# KEYS: workers, the node's roster.  ARGV: node, stale before, now.  Returns the
# roster, or nil when the node beat meanwhile (or another peer claimed it first).
_CLAIM = """
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not seen or tonumber(seen) >= tonumber(ARGV[2]) then return false end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return redis.call('SMEMBERS', KEYS[2])
"""

log = logging.getLogger("celeriac.backend")


def meta_key(task_id: str) -> str:
    return META_PREFIX + task_id


def history_key(task_id: str) -> str:
    return HISTORY_PREFIX + task_id


class RedisBackend(Backend):
    keeps_heartbeats = True

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        self.ttl = int(self.expires_seconds)
        self._client: redis.Redis | None = None
        self._pid = 0
        self._sha = ""
        self._local = threading.local()
        self._lua_reads_meta = self.serializer == "json"
        self._aclient: Any = None
        self._aclient_pid = 0
        options = app.conf.get("result_backend_transport_options") or {}
        #: Celery's ``global_keyprefix`` transport option: put before every key and channel
        self.prefix = str(options.get("global_keyprefix") or "")

    def _meta_key(self, task_id: str) -> str:
        return self.prefix + meta_key(task_id)

    def _history_key(self, task_id: str) -> str:
        return self.prefix + history_key(task_id)

    @property
    def client(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            self._client = sync_client(self.url)
            self._sha = self._client.script_load(_SET_STATE)
            self._pid = os.getpid()
        return self._client

    def _get(self, task_id: str) -> bytes | None:
        value = self.client.get(self._meta_key(task_id))
        return None if value is None else _bytes(value)

    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        if not self._lua_reads_meta:
            if roster is not None:
                self._roster_now(roster.node, roster.started, ())
            applied = [self._record_watched(r) for r in records]
            if roster is not None:
                self._roster_now(roster.node, (), roster.ended)
            return applied
        try:
            return self._record_scripted(records, roster)
        except redis.exceptions.NoScriptError:  # the server restarted: load it again
            self.load_script()
            return self._record_scripted(records, roster)

    def permanent(self, exc: BaseException) -> bool:
        """Redis refuses a record for good with an error reply (WRONGTYPE: the task's key
        holds something else; OOM: ``maxmemory`` reached under ``noeviction``; a value
        over its size limits) or a value the client cannot send.  Connection errors,
        time-outs, a server loading its data, a read-only replica after a fail-over, a
        script the server has forgotten and a busy script are waited for."""
        if isinstance(exc, redis.exceptions.ResponseError):
            return not (isinstance(exc, TRANSIENT_REPLIES)
                        or str(exc).startswith(TRANSIENT_PREFIXES))
        return super().permanent(exc) or isinstance(exc, redis.exceptions.DataError)

    @property
    def scripted(self) -> bool:
        """Whether writes go through the Lua script (JSON metas), so they can be queued
        on any pipeline (the broker's, to write results and acks in one round trip)."""
        return self._lua_reads_meta

    def record_begin(self, records: Sequence[Record]) -> Callable[[], None]:
        """History-only records (``delay()``'s "sent" entry): send the commands, let the
        caller publish the message, then read the replies, so the two round trips
        overlap.  The commands reach Redis before the message is published, so the entry
        is there before any worker can take the task.  When Redis cannot be written the
        write is done the ordinary way (retried, raising before anything is published);
        a reply that fails after the message went out is logged, not raised: the task is
        queued, only its "sent" entry is missing."""
        if any(r.state is not None for r in records):
            return super().record_begin(records)
        commands = self._history_commands(records)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
        except (redis.RedisError, OSError):
            conn.disconnect()
            pool.release(conn)
            return super().record_begin(records)

        def finish() -> None:
            try:
                for _ in commands:
                    conn.read_response()
            except (redis.RedisError, OSError) as exc:
                conn.disconnect()
                log.warning("the sent history entry of task %s was not stored: %r",
                            records[0].task_id, exc)
            finally:
                pool.release(conn)

        return finish

    async def record_async(self, records: Sequence[Record], io: Executor,
                           roster: Roster | None = None) -> list[bool]:
        """One pipelined round trip on an asyncio client of the worker's loop (JSON
        metas); other serializers take the WATCH path on the ``io`` thread."""
        if not self._lua_reads_meta:
            return await super().record_async(records, io, roster)
        if self._aclient is None or self._aclient_pid != os.getpid():
            self._aclient, self._aclient_pid = async_client(self.url), os.getpid()
        for attempt in (1, 2):
            try:
                async with self._aclient.pipeline(transaction=False) as pipe:
                    skip = self.queue_records(pipe, records, roster)
                    replies = await pipe.execute(raise_on_error=False)
                return self.applied(records, replies, skip)
            except redis.exceptions.NoScriptError:  # the server restarted: load it again
                if attempt == 2:
                    raise
                self.load_script()
        raise AssertionError("unreachable")

    def load_script(self) -> None:
        self._sha = self.client.script_load(_SET_STATE)

    def _history_commands(self, records: Sequence[Record]) -> list[tuple[Any, ...]]:
        """The commands that append history-only records (the "sent" entry)."""
        commands: list[tuple[Any, ...]] = []
        for r in records:
            commands.append(("RPUSH", self._history_key(r.task_id), _entry_json(r)))
            if self.ttl:
                commands.append(("EXPIRE", self._history_key(r.task_id), self.ttl))
        return commands

    def queue_history(self, pipe: Any, records: Sequence[Record]) -> None:
        """Queue history-only records (the "sent" entry) on ``pipe``."""
        for command in self._history_commands(records):
            pipe.execute_command(*command)

    def queue_records(self, pipe: Any, records: Sequence[Record],
                      roster: Roster | None = None) -> int:
        """Queue the commands of :meth:`record` on ``pipe`` (sync or asyncio); returns
        how many replies come before the records' own (the roster's additions)."""
        if not self._sha:
            self.client  # noqa: B018 - connects and loads the script
        skip = 0
        if roster is not None and roster.started:
            pipe.sadd(self._roster_key(roster.node), *roster.started)
            skip = 1
        for r in records:
            if r.state is None:
                self.queue_history(pipe, [r])
            else:
                pipe.evalsha(self._sha, 2, self._meta_key(r.task_id), self._history_key(r.task_id),
                             r.payload, _entry_json(r), self.ttl)
        if roster is not None and roster.ended:
            pipe.srem(self._roster_key(roster.node), *roster.ended)
        return skip

    def _record_scripted(self, records: Sequence[Record],
                         roster: Roster | None = None) -> list[bool]:
        with self.client.pipeline(transaction=False) as pipe:
            skip = self.queue_records(pipe, records, roster)
            replies = pipe.execute(raise_on_error=False)
        return self.applied(records, replies, skip)

    def _roster_key(self, node: str) -> str:
        return self.prefix + ROSTER_PREFIX + node

    def _roster_now(self, node: str, started: Sequence[str], ended: Sequence[str]) -> None:
        """A roster change on its own (the WATCH path, which writes records one by one)."""
        if started:
            self.client.sadd(self._roster_key(node), *started)
        if ended:
            self.client.srem(self._roster_key(node), *ended)

    def heartbeat(self, node: str, at: float) -> None:
        self.client.zadd(self.prefix + WORKERS_KEY, {node: at})

    def stale_nodes(self, before: float) -> dict[str, float]:
        found: Any = self.client.zrangebyscore(self.prefix + WORKERS_KEY, "-inf",
                                               f"({before}", withscores=True)
        return {_bytes(k).decode(): float(v) for k, v in found}

    def claim_node(self, node: str, before: float, now: float) -> list[str] | None:
        keys = (self.prefix + WORKERS_KEY, self._roster_key(node))
        found: Any = self.client.eval(_CLAIM, 2, *keys, node, before, now)
        return None if found is None else sorted(_bytes(t).decode() for t in found)

    def forget_node(self, node: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.prefix + WORKERS_KEY, node)
            pipe.delete(self._roster_key(node))
            pipe.execute()

    def applied(self, records: Sequence[Record], replies: list[Any], skip: int) -> list[bool]:
        """Whether each record was written, from the replies of a pipeline (executed with
        ``raise_on_error=False``) on which :meth:`queue_records` queued them after
        ``skip`` other commands; every reply after the records' own belongs to the
        roster or the acks.  An error that may pass is raised; records refused for good
        raise :class:`RecordsRefused` once the rest is known to be written."""
        for reply in replies[:skip]:
            if isinstance(reply, Exception):
                raise reply
        applied: list[bool] = []
        refused: dict[int, BaseException] = {}
        i = skip
        for n, r in enumerate(records):
            width = 1 if r.state is not None else 2 if self.ttl else 1
            mine, i = replies[i:i + width], i + width
            error = next((x for x in mine if isinstance(x, Exception)), None)
            if error is not None and not self.permanent(error):
                raise error
            if error is not None:
                refused[n] = error
            applied.append(error is None and (r.state is None or bool(mine[0])))
        for reply in replies[i:]:
            if isinstance(reply, Exception):
                raise reply
        if refused:
            raise RecordsRefused(refused)
        return applied

    def _record_watched(self, r: Record) -> bool:
        """The transition rule with WATCH/MULTI, for metas Lua cannot decode (pickle)."""
        mkey, hkey = self._meta_key(r.task_id), self._history_key(r.task_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if r.state is not None:
                        pipe.watch(mkey)
                        current = pipe.get(mkey)
                        if current is not None:
                            status = self.decode_meta(_bytes(current)).get("status")
                            if not states.may_replace(status, r.state):
                                pipe.reset()
                                return False
                        pipe.multi()
                        if self.ttl:
                            pipe.setex(mkey, self.ttl, r.payload)  # type: ignore[arg-type]
                        else:
                            pipe.set(mkey, r.payload)  # type: ignore[arg-type]
                        pipe.publish(mkey, r.payload)  # type: ignore[arg-type]
                    pipe.rpush(hkey, _entry_json(r))
                    if self.ttl:
                        pipe.expire(hkey, self.ttl)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def history(self, task_id: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.client.lrange(self._history_key(task_id), 0, -1)]

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:
        key = self.prefix + REVOKED_KEY
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, "-inf", time.time())
            for i in range(0, len(task_ids), CHUNK):
                pipe.zadd(key, dict.fromkeys(task_ids[i:i + CHUNK], until))
            pipe.zremrangebyrank(key, 0, -control.REVOKES_MAX - 1)  # keep those lapsing last
            pipe.execute()

    def revoked(self) -> dict[str, float]:
        found: Any = self.client.zrangebyscore(self.prefix + REVOKED_KEY, time.time(), "+inf",
                                               withscores=True)
        return {_bytes(k).decode(): float(v) for k, v in found}

    def waiting(self, task_ids: Sequence[str]) -> list[str]:
        found = []
        for i in range(0, len(task_ids), CHUNK):
            chunk = task_ids[i:i + CHUNK]
            with self.client.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.get(self._meta_key(task_id))
                    pipe.lindex(self._history_key(task_id), -1)
                replies = pipe.execute()
            for j, task_id in enumerate(chunk):
                meta, latest = replies[2 * j], replies[2 * j + 1]
                status = None if meta is None else self.decode_meta(_bytes(meta)).get("status")
                if states.is_waiting(status, None if latest is None
                                     else json.loads(latest).get("state")):
                    found.append(task_id)
        return found

    def forget(self, task_id: str) -> None:
        check_task_id(task_id)
        self.client.delete(self._meta_key(task_id), self._history_key(task_id))

    def exists(self, task_id: str) -> bool:
        return bool(self.client.exists(self._meta_key(task_id), self._history_key(task_id)))

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Subscribe to the key's channel, read the key once, then take the metas the
        writers publish: one read, no polling (a re-read every second guards against a
        lost subscription)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self._pubsub()
        channel = self._meta_key(task_id)
        pubsub.subscribe(channel)
        try:
            meta = self.get_meta(task_id)
            while meta["status"] not in states.READY_STATES:
                remaining = WAIT_RECHECK if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("The operation timed out.")
                message = pubsub.get_message(ignore_subscribe_messages=True,
                                             timeout=min(remaining, WAIT_RECHECK))
                if message is None:
                    meta = self.get_meta(task_id)
                elif message["type"] == "message" and message["channel"] == channel.encode():
                    meta = self.decode_meta(_bytes(message["data"]))
            return meta
        finally:
            pubsub.unsubscribe(channel)

    def _pubsub(self) -> Any:
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None or getattr(self._local, "pid", None) != os.getpid():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self._local.pubsub, self._local.pid = pubsub, os.getpid()
        return pubsub

    def close(self) -> None:
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is not None and getattr(self._local, "pid", None) == os.getpid():
            pubsub.close()
        self._local.pubsub = None
        if self._client is not None and self._pid == os.getpid():
            self._client.close()
        self._client = None


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _entry_json(r: Record) -> str:
    return serialization.json_dumps_lenient(r.entry)
