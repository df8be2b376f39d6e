"""Throughput, round trip, memory and queue drain on a server broker and result store.

Three setups (``--setup``), each run with celeriac and with Celery 5.7 in the same run:

``redis``       Redis broker, results in the same Redis database;
``amqp-redis``  RabbitMQ broker, Redis results;
``amqp-file``   RabbitMQ broker, file results (``file:///<tmp>/results``).

celeriac: ``Celery('benchtasks', broker=BROKER, backend=BACKEND)`` (for ``redis`` the
backend is left out: the same database is celeriac's default).  Celery 5.7: the same
URLs, kombu's transports and Celery's backends, prefork pool.  Both workers run ``-c 2``
with their default settings, on the same no-op task.

Isolation: Redis runs use one database of their own (``--db``, default 13), flushed
before and after each side (the script refuses to start when it holds keys, unless
``--force``); RabbitMQ runs use a virtual host of their own (``--vhost``, default
``celeriac-bench``, created with ``rabbitmqctl`` and deleted at the end) whose queues
are deleted between sides.  While it runs the script notes the CPU time of other
processes and warns when someone else used more than 5 % of the CPUs.

Per side, measured as in ``embedded.py`` (same producer code) after the worker has
answered a warm-up task:

(a) enqueue rate: N ``delay()`` calls in a row (the worker is consuming meanwhile);
(b) end-to-end: from the first ``delay()`` to the last of the N results being ready
    ((a) and (b) are one run, done ``--repeat`` times: the median is reported);
(c) round trip: ``delay().get()`` one after the other, p50 / p90 after warm-up calls;
(d) worker memory: summed RSS of the worker's processes (from /proc) after the run;
(e) drain: with no worker running, a producer queues M tasks (``delay()``); then the
    worker starts, and the time from its first take (the queue getting shorter: start-up
    is not timed) until all M results are stored gives a per-task rate, for a small
    queue (``--drain-small``, ``--drain-small-repeat`` times, median) and a large one
    (``--drain-large``, once).

Usage::

    .venv/bin/python benchmarks/servers.py --setup redis|amqp-redis|amqp-file
        [--n 5000] [--repeat 3] [--db 13] [--vhost celeriac-bench]
        [--drain-large 100000] [--drain-large-sides celeriac,celery]
        [--only celeriac|celery] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import _common as common
import amqp
import embedded
import redis

SIDES = embedded.SIDES
MODULE = embedded.MODULE
SETUPS = ("redis", "amqp-redis", "amqp-file")
QUEUE = "celery"  # the default queue on both sides (the Redis list of priority 0-2)
CLIENT_TIMEOUT = 600.0
#: Longest a worker may take to take its first message in a drain test.
START_TIMEOUT = 90.0

CELERIAC_MODULE = '''\
from celeriac import Celery

app = Celery("benchtasks", broker="{broker}"{backend_arg})


@app.task
def noop():
    return None
'''

CELERY_MODULE = '''\
from celery import Celery

app = Celery("benchtasks", broker="{broker}", backend="{backend}")
app.conf.broker_connection_retry_on_startup = True


@app.task
def noop():
    return None
'''


# ---------------------------------------------------------------------- producer side


def run_fill(n: int, ids_path: str) -> None:
    """Queue ``n`` tasks with no worker running; write their ids, print the time taken."""
    sys.path.insert(0, os.getcwd())
    import benchtasks  # type: ignore[import-not-found]

    noop = benchtasks.noop
    t0 = time.perf_counter()
    ids = [noop.delay().id for _ in range(n)]
    elapsed = time.perf_counter() - t0
    with open(ids_path, "w") as f:
        json.dump(ids, f)
    print(json.dumps({"fill_s": elapsed}), flush=True)


# ---------------------------------------------------------------------- stores


class RedisDB:
    """The one Redis database this run uses."""

    def __init__(self, base: str, db: int) -> None:
        self.url = f"{base.rstrip('/')}/{db}"
        self.number = db
        self.client = redis.Redis.from_url(self.url)

    def check_empty(self, force: bool) -> None:
        keys = self.client.dbsize()
        if keys and not force:
            raise SystemExit(f"{self.url} holds {keys} keys: choose another --db, or pass "
                             "--force to flush it")

    def flush(self) -> None:
        self.client.flushdb()

    def queued(self) -> int:
        return int(self.client.llen(QUEUE))

    def not_done(self, ids: list[str], chunk: int = 5000) -> list[str]:
        """The ids whose result is not SUCCESS yet (pipelined MGETs)."""
        left = []
        for i in range(0, len(ids), chunk):
            part = ids[i:i + chunk]
            values = self.client.mget([f"celery-task-meta-{t}" for t in part])
            left += [t for t, v in zip(part, values, strict=True)
                     if v is None or b"SUCCESS" not in v]
        return left

    def version(self) -> str:
        try:
            return str(self.client.info("server")["redis_version"])
        except redis.RedisError:
            return "?"


class RabbitVhost:
    """A RabbitMQ virtual host of the run's own, made with ``rabbitmqctl``."""

    def __init__(self, host: str, vhost: str) -> None:
        self.vhost = vhost
        self.url = f"amqp://guest:guest@{host}/{vhost}"
        self._host = host
        self._conn: amqp.Connection | None = None
        self._channel: Any = None

    def _ctl(self, *argv: str) -> str:
        proc = subprocess.run(["rabbitmqctl", "-q", *argv], capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"rabbitmqctl {' '.join(argv)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def create(self) -> None:
        if self.vhost in self._ctl("list_vhosts", "name").split():
            self._ctl("delete_vhost", self.vhost)
        self._ctl("add_vhost", self.vhost)
        self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    def delete(self) -> None:
        self._close()
        self._ctl("delete_vhost", self.vhost)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = self._channel = None

    def _chan(self) -> Any:
        if self._conn is None:
            self._conn = amqp.Connection(self._host, userid="guest", password="guest",
                                         virtual_host=self.vhost)
            self._conn.connect()
            self._channel = self._conn.channel()
        return self._channel

    def queued(self) -> int:
        """Messages ready in the default queue (0 when it does not exist yet)."""
        try:
            return int(self._chan().queue_declare(QUEUE, passive=True).message_count)
        except amqp.exceptions.NotFound:
            self._close()  # the failed passive declare closed the channel
            return 0

    def flush(self) -> None:
        """Delete the default queue (either side declares it again on start)."""
        with contextlib.suppress(amqp.exceptions.NotFound):
            self._chan().queue_delete(QUEUE)
        self._close()

    def version(self) -> str:
        conn = amqp.Connection(self._host, userid="guest", password="guest",
                               virtual_host=self.vhost)
        conn.connect()
        try:
            return str(conn.server_properties.get("version", "?"))
        finally:
            conn.close()


class FileResults:
    """A directory of result files (``file://`` backend), one per side."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.url = f"file://{directory}"

    def flush(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory)

    def not_done(self, ids: list[str]) -> list[str]:
        left = []
        for t in ids:
            try:
                with open(os.path.join(self.directory, f"celery-task-meta-{t}"), "rb") as f:
                    if b"SUCCESS" in f.read():
                        continue
            except OSError:
                pass
            left.append(t)
        return left


class Store:
    """What one setup runs on: a broker (Redis database or RabbitMQ vhost) and a result
    store (the same Redis database, another one, or a directory of files)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.setup = args.setup
        self.redis = RedisDB(args.redis, args.db) if "redis" in args.setup else None
        self.rabbit = RabbitVhost(args.amqp, args.vhost) if args.setup.startswith(
            "amqp") else None
        self.files: FileResults | None = None
        self.no_confirm = bool(args.no_confirm)

    @property
    def broker(self) -> RedisDB | RabbitVhost:
        broker = self.rabbit or self.redis
        assert broker is not None
        return broker

    def use_files(self, directory: str) -> None:
        """Results of the side about to run go to ``directory`` (``amqp-file``)."""
        if self.setup == "amqp-file":
            self.files = FileResults(directory)
            self.files.flush()

    @property
    def backend_url(self) -> str:
        if self.files is not None:
            return self.files.url
        assert self.redis is not None
        return self.redis.url

    def open(self, force: bool) -> None:
        if self.redis is not None:
            self.redis.check_empty(force)
        if self.rabbit is not None:
            self.rabbit.create()

    def close(self) -> None:
        self.flush()
        if self.rabbit is not None:
            self.rabbit.delete()

    def flush(self) -> None:
        if self.redis is not None:
            self.redis.flush()
        if self.rabbit is not None:
            self.rabbit.flush()
        if self.files is not None:
            self.files.flush()

    def queued(self) -> int:
        return self.broker.queued()

    def not_done(self, ids: list[str]) -> list[str]:
        if self.files is not None:
            return self.files.not_done(ids)
        assert self.redis is not None
        return self.redis.not_done(ids)

    def describe_left(self) -> str:
        if self.setup == "redis":
            assert self.redis is not None
            return f"{self.redis.client.hlen('unacked')} messages unacked"
        return f"{self.queued()} messages ready in the queue"

    def versions(self) -> str:
        parts = []
        if self.redis is not None:
            parts.append(f"redis-py {common._version('redis')}, hiredis "
                         f"{common._version('hiredis')}, Redis server {self.redis.version()}")
        if self.rabbit is not None:
            parts.append(f"aio-pika {common._version('aio-pika')}, py-amqp "
                         f"{common._version('amqp')}, RabbitMQ {self.rabbit.version()}")
        return ", ".join(parts) + " (same machine)"


SERVER_NAMES = ("redis-server", "beam.smp")


def server_pids() -> list[int]:
    """The Redis and RabbitMQ server processes, by command name."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in SERVER_NAMES:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


class Watcher:
    """Notes what else used the machine while the benchmark ran: the CPU time of
    processes other than this script, its children and the broker/result servers, and
    (with Redis) clients of other databases that sent commands (a test suite, say)."""

    def __init__(self, store: Store, every: float = 0.5) -> None:
        self.redis = store.redis
        self.client = redis.Redis.from_url(store.redis.url) if store.redis else None
        self.every = every
        self.polls = 0
        self.busy_polls = 0
        self.max_clients = 0
        self.dbs: set[int] = set()
        self.servers = server_pids()
        self.started = time.monotonic()
        self.cpu0 = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cpu(self) -> tuple[float, float, float]:
        """CPU seconds: the machine's busy time, this process and its waited-for
        children, and the servers."""
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:8]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / tick  # user nice system irq softirq
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        server = 0.0
        for pid in self.servers:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                server += (int(stat[11]) + int(stat[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return busy, ours, server

    def _run(self) -> None:
        if self.client is None or self.redis is None:
            return
        while not self._stop.wait(self.every):
            try:
                clients = self.client.client_list()
            except redis.RedisError:
                continue
            # other databases' clients that sent a command in the last second (a client
            # of ours is in database 0 for a moment while it connects)
            others = [c for c in clients if int(c.get("db", 0)) != self.redis.number
                      and int(c.get("age", 0)) >= 1 and int(c.get("idle", 0)) <= 1]
            self.polls += 1
            if others:
                self.busy_polls += 1
                self.max_clients = max(self.max_clients, len(others))
                self.dbs.update(int(c.get("db", 0)) for c in others)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        busy, ours, server = (b - a for a, b in zip(self.cpu0, self._cpu(), strict=True))
        self.elapsed = time.monotonic() - self.started
        self.foreign_cpu = max(0.0, busy - ours - server)

    def _share(self) -> float:
        return self.foreign_cpu / (self.elapsed * len(os.sched_getaffinity(0)))

    def _clients_seen(self) -> str:
        if self.client is None:
            return ""
        if not self.busy_polls:
            return ", and no client of another database of the Redis server sent commands"
        dbs = ", ".join(map(str, sorted(self.dbs)))
        return (f", and clients of other databases of the Redis server ({dbs}) sent "
                f"commands during {self.busy_polls} of {self.polls} checks (up to "
                f"{self.max_clients} at once)")

    def summary(self) -> str | None:
        """A warning when processes other than the benchmark's and the servers' used
        more than 5 % of the CPUs."""
        if self._share() <= 0.05:
            return None
        return (f"other processes used {self.foreign_cpu:.0f} CPU-seconds, "
                f"{self._share():.0%} of the machine's CPUs over the run{self._clients_seen()}:"
                " they competed with the benchmark, so the figures may be disturbed")

    def quiet_line(self) -> str:
        return (f"During the run processes other than the benchmark's and the servers' "
                f"used {self._share():.1%} of the CPUs{self._clients_seen()}.")


def worker_problems(log_path: str) -> list[str]:
    """Error lines, and lines that tell of a lost connection or a retried write."""
    problems = embedded.worker_problems(log_path)
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return problems
    return problems + [line for line in lines if line not in problems and (
        "Connection to broker lost" in line or "failed (" in line)]


# ---------------------------------------------------------------------- orchestration


def worker_argv(side: str) -> list[str]:
    # the same worker command lines as embedded.py: -c 2, Celery with --pool prefork
    return embedded.worker_argv(side)


class Side:
    """One side's temp directory, environment and processes."""

    def __init__(self, side: str, args: argparse.Namespace, store: Store) -> None:
        self.side, self.args, self.db = side, args, store
        self.directory = tempfile.mkdtemp(prefix=f"bench-{args.setup}-{side}-")
        store.use_files(os.path.join(self.directory, "results"))
        env = dict(os.environ)
        env["TMPDIR"] = self.directory
        for var in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            env.pop(var, None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.env = env
        broker, backend = store.broker.url, store.backend_url
        if side == "celery":
            source = CELERY_MODULE.format(broker=broker, backend=backend)
        else:
            backend_arg = "" if args.setup == "redis" else f", backend={backend!r}"
            if args.no_confirm:
                backend_arg += ", broker_transport_options={'confirm_publish': False}"
            source = CELERIAC_MODULE.format(broker=broker, backend_arg=backend_arg)
        with open(os.path.join(self.directory, f"{MODULE}.py"), "w") as f:
            f.write(source)
        self.workers: list[common.Started] = []

    def start_worker(self, label: str) -> common.Started:
        w = common.Started(worker_argv(self.side), cwd=self.directory, env=self.env,
                           log_path=os.path.join(self.directory, f"worker-{label}.log"))
        self.workers.append(w)
        return w

    def run_script(self, extra: list[str], timeout: float) -> dict[str, Any]:
        argv = [sys.executable, os.path.abspath(__file__), *extra]
        try:
            proc = subprocess.run(argv, cwd=self.directory, env=self.env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"producer did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not proc.stdout.strip():
            err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"producer failed: {err}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        return out

    def cleanup(self) -> None:
        for w in self.workers:
            w.stop()
        if not self.args.keep:
            shutil.rmtree(self.directory, ignore_errors=True)


def measure(side: Side, result: dict[str, Any]) -> None:
    """(a)-(d), with one worker."""
    args = side.args
    worker = side.start_worker("main")
    print(f"[{side.side}] producer: {args.repeat} x {args.n} tasks, then "
          f"{args.warmup}+{args.samples} round trips", flush=True)
    try:
        result.update(side.run_script(
            ["--client", side.side, "--n", str(args.n), "--repeat", str(args.repeat),
             "--samples", str(args.samples), "--warmup", str(args.warmup)], CLIENT_TIMEOUT))
        result["rss_mb"], result["processes"] = common.rss_mb(worker.pid)
    finally:
        result["worker_problems"] = worker_problems(worker.log_path)
        if "rss_mb" not in result:
            result["worker_log"] = worker.log_tail(15)
        worker.stop()


def drain_once(side: Side, m: int, label: str) -> dict[str, Any]:
    """Queue ``m`` tasks with no worker, start one, time from its first take to the last
    result stored."""
    db = side.db
    db.flush()
    ids_path = os.path.join(side.directory, f"ids-{label}.json")
    fill = side.run_script(["--fill", str(m), "--ids-file", ids_path], CLIENT_TIMEOUT)
    with open(ids_path) as f:
        ids: list[str] = json.load(f)
    os.unlink(ids_path)
    if db.queued() != m:
        raise RuntimeError(f"expected {m} queued messages, found {db.queued()}")
    worker = side.start_worker(label)
    try:
        started = time.perf_counter()
        while db.queued() >= m:  # start-up: not timed
            if not worker.alive():
                raise RuntimeError("worker exited:\n" + worker.log_tail(15))
            if time.perf_counter() - started > START_TIMEOUT:
                raise RuntimeError(f"worker took nothing within {START_TIMEOUT:.0f} s")
            time.sleep(0.002)
        t0 = time.perf_counter()
        deadline = t0 + side.args.drain_timeout
        while db.queued() > 0:
            if time.perf_counter() > deadline or not worker.alive():
                raise RuntimeError(f"queue not drained: {db.queued()} left")
            time.sleep(0.005)
        # the last ones taken are the last ones queued: wait for those, then check all
        tail = ids[-200:]
        while db.not_done(tail):
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"last results not stored within {side.args.drain_timeout:.0f} s: "
                    f"{len(db.not_done(ids))} of {m} results missing, "
                    f"{db.describe_left()}")
            time.sleep(0.002)
        t1 = time.perf_counter()
        left = db.not_done(ids)
        while left:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{len(left)} results not stored in time")
            time.sleep(0.005)
            left = db.not_done(left)
            t1 = time.perf_counter()
        problems = worker_problems(worker.log_path)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; worker log {worker.log_path} ends:\n"
                           f"{worker.log_tail(10)}") from None
    finally:
        worker.stop()
        db.flush()
    return {"fill_s": fill["fill_s"], "startup_s": t0 - started, "drain_s": t1 - t0,
            "problems": problems}


def drain(side: Side, result: dict[str, Any]) -> None:
    """(e): the small queue (median of several), then the large one."""
    args = side.args
    small = []
    for i in range(args.drain_small_repeat):
        print(f"[{side.side}] drain {args.drain_small:,} queued tasks ({i + 1}/"
              f"{args.drain_small_repeat})", flush=True)
        small.append(drain_once(side, args.drain_small, f"drain-small-{i}"))
    for r in small:
        result["worker_problems"] += r["problems"]
    result["drain_small"] = args.drain_small
    result["drain_small_runs_s"] = [r["drain_s"] for r in small]
    result["drain_small_s"] = statistics.median(result["drain_small_runs_s"])
    result["drain_startup_s"] = statistics.median(r["startup_s"] for r in small)
    if side.side not in args.drain_large_sides or args.drain_large <= 0:
        return
    print(f"[{side.side}] drain {args.drain_large:,} queued tasks (queueing them first)",
          flush=True)
    large = drain_once(side, args.drain_large, "drain-large")
    result["worker_problems"] += large["problems"]
    result["drain_large"] = args.drain_large
    result["drain_large_s"] = large["drain_s"]
    result["fill_large_s"] = large["fill_s"]


def run_side(side_name: str, args: argparse.Namespace, db: Store) -> dict[str, Any]:
    result: dict[str, Any] = {"side": side_name, "n": args.n}
    side = Side(side_name, args, db)
    print(f"[{side_name}] {side.directory}, {db.broker.url}, {db.backend_url}", flush=True)
    db.flush()
    try:
        measure(side, result)
        db.flush()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{side_name}] FAILED: {result['error']}", flush=True)
    try:
        if args.drain_small > 0 and "error" not in result:
            drain(side, result)
    except Exception as exc:  # keeps (a)-(d)
        result["drain_error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{side_name}] drain FAILED: {result['drain_error']}", flush=True)
    finally:
        side.cleanup()
        db.flush()
    return result


# ---------------------------------------------------------------------- the table


def rows_for(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header, rows = embedded.rows_for(results)
    sides = [s for s in SIDES if s in results]
    both = len(sides) == 2

    def rate(side: str, size_key: str, time_key: str) -> float | None:
        r = results[side]
        if size_key not in r or time_key not in r:
            return None
        return float(r[size_key]) / r[time_key]

    def rate_row(label: str, size_key: str, time_key: str) -> list[str]:
        v = {s: rate(s, size_key, time_key) for s in sides}
        cells = [label, *(embedded.fmt(v[s]) for s in sides)]
        return cells + ([embedded.ratio(v["celeriac"], v["celery"])] if both else [])

    def per_side(label: str, cell: Any) -> list[str]:
        return [label, *(cell(results[s]) for s in sides), *([""] if both else [])]

    def slowdown(r: dict[str, Any]) -> str:
        if "drain_large_s" not in r or "drain_small_s" not in r:
            return "—"
        large = r["drain_large"] / r["drain_large_s"]
        small = r["drain_small"] / r["drain_small_s"]
        return f"{large / small:.2f}×"

    def small_spread(r: dict[str, Any]) -> str:
        runs = r.get("drain_small_runs_s")
        if not runs:
            return "—"
        rates = sorted(r["drain_small"] / t for t in runs)
        return f"{rates[0]:,.0f}–{rates[-1]:,.0f}"

    small = next((results[s]["drain_small"] for s in sides if "drain_small" in results[s]),
                 None)
    large = next((results[s]["drain_large"] for s in sides if "drain_large" in results[s]),
                 None)
    if small:
        rows += [
            rate_row(f"(e) drain {small:,} queued, tasks/s", "drain_small", "drain_small_s"),
            per_side("(e) lowest–highest run", small_spread),
        ]
    if large:
        rows += [
            rate_row(f"(e) drain {large:,} queued, tasks/s", "drain_large", "drain_large_s"),
            per_side(f"(e) {large:,} rate / {small:,} rate", slowdown),
            per_side(f"(e) {large:,} queued, first take to last result, s",
                     lambda r: embedded.fmt(r.get("drain_large_s"), 1)),
            rate_row(f"(e) queueing the {large:,} (no worker), delay()/s", "drain_large",
                     "fill_large_s"),
        ]
    if small:
        rows.append(per_side("(e) worker start to first take (not timed), s",
                             lambda r: embedded.fmt(r.get("drain_startup_s"), 2)))
    return header, rows


def targets(results: dict[str, dict[str, Any]], setup: str) -> list[str]:
    c, y = results.get("celeriac", {}), results.get("celery", {})
    out = []
    if "e2e_s" in c and "e2e_s" in y:
        r = (c["n"] / c["e2e_s"]) / (y["n"] / y["e2e_s"])
        out.append(f"end-to-end throughput ≥ 10× Celery's: **{'met' if r >= 10 else 'not met'}**"
                   f" ({r:.2f}×)")
    if "rt_p50_ms" in c and setup == "redis":
        p50 = c["rt_p50_ms"]
        out.append(f"round-trip p50 ≤ 1 ms: **{'met' if p50 <= 1.0 else 'not met'}** "
                   f"({p50:.2f} ms)")
    if "drain_large_s" in c and "drain_small_s" in c:
        r = (c["drain_large"] / c["drain_large_s"]) / (c["drain_small"] / c["drain_small_s"])
        out.append(f"{c['drain_large']:,} queued drain at no lower per-task rate than "
                   f"{c['drain_small']:,}: **{'met' if r >= 0.95 else 'not met'}** ({r:.2f}×, "
                   "within 5 % counts as met)")
    return out


TITLES = {
    "redis": "Redis broker and results",
    "amqp-redis": "RabbitMQ broker, Redis results",
    "amqp-file": "RabbitMQ broker, file results",
}


def setup_lines(store: Store) -> list[str]:
    broker, backend = store.broker.url, store.backend_url
    if store.setup == "redis":
        return [
            f"- celeriac: `Celery('benchtasks', broker='{broker}')` (results in the same "
            "Redis database, the default), `celeriac -A benchtasks worker -c 2`.",
            f"- Celery 5.7: `Celery('benchtasks', broker='{broker}', backend='{backend}')` "
            "(kombu's Redis transport, Celery's Redis result backend), "
            "`celery -A benchtasks worker -c 2 --pool prefork -l WARNING`.",
        ]
    if store.setup == "amqp-redis":
        backend_text = f"backend='{backend}'"
        kinds = "kombu's py-amqp transport, Celery's Redis result backend"
    else:
        backend_text = "backend='file:///<side's tmp>/results'"
        kinds = "kombu's py-amqp transport, Celery's file system result backend"
    confirms = ("publisher confirms off (`broker_transport_options={'confirm_publish': "
                "False}`), as Celery's default: `delay()` does not wait for RabbitMQ"
                if store.no_confirm else "publisher confirms on (its default: `delay()` "
                "returns once RabbitMQ has the message)")
    return [
        f"- celeriac: `Celery('benchtasks', broker='{broker}', {backend_text})`, "
        f"`celeriac -A benchtasks worker -c 2`; {confirms}.",
        f"- Celery 5.7: `Celery('benchtasks', broker='{broker}', {backend_text})` ({kinds}), "
        "`celery -A benchtasks worker -c 2 --pool prefork -l WARNING`; publisher confirms "
        "off (kombu's default, `confirm_publish=False`).",
    ]


def section(args: argparse.Namespace, results: dict[str, dict[str, Any]], store: Store,
            versions: str) -> str:
    header, rows = rows_for(results)
    lines = [
        f"## {TITLES[args.setup]}: throughput, round trip, drain"
        + (" (celeriac without publisher confirms)" if args.no_confirm else ""),
        "",
        *setup_lines(store),
        "- Both workers keep their defaults otherwise (Celery: heartbeat, mingle and "
        "gossip on).  Task: `@app.task def noop(): return None`; one producer process; "
        "same N and sample counts on both sides.  Broker and result store are emptied "
        "before and after each side and between drain runs.",
        "",
        f"Command: `{common.command_line()}`  ",
        f"Date: {common.today()}  ",
        "Machine: " + common.machine_line(("celeriac", "celery", "kombu")) + ", " + versions,
        "",
        common.markdown_table(header, rows),
        "",
        "Ratio: how many times better celeriac is: celeriac / Celery for rates, "
        "Celery / celeriac for latencies and memory.  (a) and (b) ran "
        f"{args.repeat} time(s) per side with the same worker; the table shows the median "
        "run and the lowest and highest.",
        "",
    ]
    met = targets(results, args.setup)
    if met:
        lines += ["Targets for celeriac: " + "; ".join(met) + ".", ""]
    notes = [
        "(e) drain: the producer queues the tasks with `delay()` while no worker runs "
        "(a fresh worker is started for every drain run); the clock starts when the "
        "queue first gets shorter (the worker's start-up is not timed) and stops "
        "when every result is SUCCESS (the queue length is polled every 5 ms).  The "
        f"small drain ran {args.drain_small_repeat} time(s) (median shown), the large "
        "one once, for "
        + (", ".join(s for s in SIDES if s in results and "drain_large" in results[s])
           or "neither side") + ".",
        "Enqueue rate (a) is measured with the worker running, so the producer competes "
        "with it (and with the servers) for the two cores, as in real use.  Worker "
        "RSS sums the main process and its children, so pages shared after fork count "
        "more than once (on both sides).",
    ]
    if args.setup == "amqp-file" and "celery" in results:
        notes.append("Celery's round trip with file results is set by `get()` polling "
                     "the file every 0.5 s (its default `interval`); celeriac's `get()` is "
                     "woken by a datagram when the result file is renamed into place.")
    if args.interference:
        notes.append(f"**Warning**: {args.interference}.")
    elif args.quiet_line:
        notes.append(args.quiet_line)
    skipped = [s for s in SIDES if s in results and "error" not in results[s]
               and args.drain_large > 0 and s not in args.drain_large_sides]
    if skipped:
        notes.append(f"The {args.drain_large:,}-task drain was not run for "
                     f"{', '.join(skipped)} (`--drain-large-sides`), to keep the run "
                     "within about ten minutes.")
    for side in SIDES:
        r = results.get(side)
        if r is None:
            continue
        if note := common.failure_note(side, r):
            notes.append(note)
        if "drain_error" in r:
            notes.append(f"**{side}'s drain test failed**: `{r['drain_error']}`")
        elif note := common.problems_note(side, r):
            notes.append(note)
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=SETUPS, default="redis",
                        help="broker and result store (default redis)")
    parser.add_argument("--no-confirm", action="store_true",
                        help="celeriac publishes without RabbitMQ publisher confirms, as "
                        "Celery does by default (its section gets -noconfirm)")
    common.add_server_args(parser)
    parser.add_argument("--force", action="store_true",
                        help="flush the database even if it holds keys at the start")
    parser.add_argument("--n", type=int, default=5000, help="tasks for (a)/(b), both sides")
    parser.add_argument("--samples", type=int, default=300, help="round trips per side")
    common.add_sampling_args(parser)
    parser.add_argument("--drain-small", type=int, default=1000,
                        help="tasks in the small drain test (0: no drain tests)")
    parser.add_argument("--drain-small-repeat", type=int, default=3)
    parser.add_argument("--drain-large", type=int, default=None,
                        help="tasks in the large drain test (0: none; default 100,000 "
                        "with Redis as broker, 20,000 with RabbitMQ)")
    parser.add_argument("--drain-large-sides", default="celeriac,celery",
                        help="comma-separated sides that run the large drain")
    parser.add_argument("--drain-timeout", type=float, default=400.0,
                        help="longest one drain may take, s")
    common.add_output_args(parser, SIDES)
    parser.add_argument("--client", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--fill", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        embedded.run_client(args.client, args.n, args.repeat, args.samples, args.warmup, None)
        return 0
    if args.fill is not None:
        run_fill(args.fill, args.ids_file)
        return 0
    args.drain_large_sides = [s.strip() for s in args.drain_large_sides.split(",")
                              if s.strip()]
    if args.drain_large is None:
        args.drain_large = 100_000 if args.setup == "redis" else 20_000

    if args.no_confirm and not args.setup.startswith("amqp"):
        parser.error("--no-confirm applies to the RabbitMQ setups")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    store = Store(args)
    store.open(args.force)
    results: dict[str, dict[str, Any]] = {}
    watcher = Watcher(store)
    try:
        versions = store.versions()
        for side in SIDES:
            if args.only and side != args.only:
                continue
            started = time.monotonic()
            results[side] = run_side(side, args, store)
            print(f"[{side}] done in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        watcher.stop()
        store.close()
    args.interference = watcher.summary()
    args.quiet_line = watcher.quiet_line()

    header, rows = rows_for(results)
    print()
    print(common.plain_table(header, rows))
    for line in targets(results, args.setup):
        print("target:", line.replace("**", ""))
    if args.interference:
        print("WARNING:", args.interference)
    else:
        print(args.quiet_line)
    for side, r in results.items():
        if "error" in r:
            print(f"\n{side} failed: {r['error']}\n{r.get('worker_log', '')}")
        if "drain_error" in r:
            print(f"\n{side}'s drain test failed: {r['drain_error']}")
        elif r.get("worker_problems"):
            print(f"\n{side}'s worker logged errors:\n" + "\n".join(r["worker_problems"][:10]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": args.setup, "results": results}, f)
    if args.write:
        name = args.setup + ("-noconfirm" if args.no_confirm else "")
        common.write_section(name, section(args, results, store, versions))
    return 1 if any("error" in r or "drain_error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
