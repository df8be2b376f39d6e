"""Task lifecycle figures: surviving worker kills, and many delayed tasks.

``kills``: N ``acks_late`` tasks of 50 ms each are queued; a ``celeriac worker -c 2`` works
through them and is SIGKILLed (the whole process group, as a crashed machine would
lose it) three times during the run, and started again each time.  Then every task must
have stored SUCCESS exactly once.  Reported: tasks lost (no SUCCESS), tasks whose SUCCESS
was written twice (counted in the history), tasks whose body ran more than once (killed
mid-run and run again: at-least-once delivery), redelivered tasks skipped because SUCCESS
was stored already.

``hostloss``: a worker (``-c 2``, default 2 s heartbeats) runs 4 early-acked tasks that
take minutes; a second worker is up; the first is SIGKILLed whole (supervisor and
processes at once, as when its machine dies).  Reported: how many of the 4 became
FAILURE (WorkerLostError), and how long after the kill the last one did (the documented
bound is about 12 s).  Celery 5.7 on Redis is run the same way (``task_track_started``),
and its tasks' state is read after the same wait plus a minute.

``countdown``: N tasks with a one-hour countdown are queued to a running worker: its
memory (RSS of all its processes) before and after they have all been received and put
back in the broker until due, and the time ``app.control.revoke(ids)`` takes to revoke
them all (REVOKED stored for each).

    .venv/bin/python benchmarks/lifecycle.py [--write] [--kills-n 1000] [--countdown-n 100000]

Redis runs use database ``--db`` (default 13, flushed); RabbitMQ runs a virtual host of
their own (``--vhost``, default ``celeriac-bench``).  Do not run it while the tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    Started,
    add_server_args,
    command_line,
    machine_line,
    rss_mb,
    today,
    tool,
    wait_until,
    write_section,
)
from servers import RabbitVhost, RedisDB  # noqa: E402

TASKS = """
import asyncio
import os
import time
from celeriac import Celery

app = Celery('lc', broker=os.environ['LC_BROKER'], backend=os.environ['LC_BACKEND'])
app.conf.update(broker_transport_options={'visibility_timeout': 5},
                worker_prefetch_multiplier=2)


@app.task(acks_late=True)
def work(i):
    with open(os.environ['LC_RUNS'], 'a') as f:
        f.write(f'{i}\\n')
    time.sleep(0.05)
    return i


@app.task
def later(i):
    return i


@app.task(track_started=True)
async def hang(seconds):
    await asyncio.sleep(seconds)
"""

CELERY_TASKS = """
import os
import time
from celery import Celery

app = Celery('lchost', broker=os.environ['LC_BROKER'], backend=os.environ['LC_BACKEND'])
app.conf.update(task_track_started=True)


@app.task
def hang(seconds):
    time.sleep(seconds)
"""
#: Early-acked tasks running on the worker that is killed whole.
HOST_TASKS = 4


class Setup:
    def __init__(self, kind: str, args: argparse.Namespace, directory: str) -> None:
        self.kind = kind
        self.redis = RedisDB(args.redis, args.db) if kind != "sqlite" else None
        self.rabbit = RabbitVhost(args.amqp, args.vhost) if kind == "amqp" else None
        if kind == "sqlite":
            self.broker = self.backend = f"sqlite:///{directory}/lc.db"
        else:
            assert self.redis is not None
            self.backend = self.redis.url
            self.broker = self.rabbit.url if self.rabbit else self.redis.url

    def __enter__(self) -> Setup:
        if self.redis:
            self.redis.flush()
        if self.rabbit:
            self.rabbit.create()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.redis:
            self.redis.flush()
        if self.rabbit:
            self.rabbit.delete()


def _worker(directory: str, env: dict[str, str], n: int, *extra: str) -> Started:
    w = Started([tool("celeriac"), "-A", "lctasks", "worker", "-c", "2", "-l", "INFO", *extra],
                cwd=directory, env=env, log_path=os.path.join(directory, f"worker-{n}.log"))
    if not wait_until(lambda: "celeriac worker" in _read(w.log_path), 30):
        raise SystemExit(f"the worker did not start:\n{w.log_tail()}")
    return w


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _app(directory: str, env: dict[str, str]) -> Any:
    os.environ.update(env)
    sys.path.insert(0, directory)
    import importlib

    sys.modules.pop("lctasks", None)
    return importlib.import_module("lctasks")


@contextlib.contextmanager
def project(kind: str, args: argparse.Namespace) -> Iterator[tuple[str, Setup, dict[str, str],
                                                                  Any]]:
    """A temporary directory with the tasks module, the stores set up, the workers'
    environment, and the tasks module imported here."""
    directory = tempfile.mkdtemp(prefix=f"celeriac-lifecycle-{kind}-")
    with open(os.path.join(directory, "lctasks.py"), "w") as f:
        f.write(TASKS)
    try:
        with Setup(kind, args, directory) as setup:
            env = dict(os.environ, LC_BROKER=setup.broker, LC_BACKEND=setup.backend,
                       LC_RUNS=os.path.join(directory, "runs"), PYTHONUNBUFFERED="1")
            yield directory, setup, env, _app(directory, env)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


def run_kills(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with project(kind, args) as (directory, setup, env, mod):
        ids = [mod.work.delay(i).id for i in range(args.kills_n)]
        backend = mod.app.backend
        began = time.monotonic()
        workers = [_worker(directory, env, 0)]
        expected = args.kills_n * 0.05 / 2
        for k in range(3):  # three kills spread over the run
            time.sleep(expected / 4)
            os.killpg(workers[-1].pid, signal.SIGKILL)
            workers[-1].stop(grace=0)
            workers.append(_worker(directory, env, k + 1))

        def done() -> bool:
            return sum(backend.stored_state(t) == "SUCCESS" for t in ids) == len(ids)

        wait_until(done, args.timeout, step=1.0)
        took = time.monotonic() - began
        workers[-1].stop()
        succeeded = sum(backend.stored_state(t) == "SUCCESS" for t in ids)
        double = sum(1 for t in ids
                     if [h["state"] for h in backend.history(t)].count("SUCCESS") > 1)
        runs = Counter(_read(env["LC_RUNS"]).split())
        logs = "".join(_read(w.log_path) for w in workers)
        return {"broker": kind, "tasks": len(ids), "lost": len(ids) - succeeded,
                "double_success": double,
                "ran_again": sum(1 for c in runs.values() if c > 1),
                "skipped": logs.count("succeeded already: not run again"),
                "seconds": took}


def _all_in(backend: Any, ids: list[str], state: str) -> bool:
    return all(backend.stored_state(t) == state for t in ids)


def run_hostloss(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with project(kind, args) as (directory, setup, env, mod):
        backend = mod.app.backend
        alpha = _worker(directory, env, 0, "-n", "alpha@%h")
        beta = None
        try:
            time.sleep(2.0)  # both its processes consuming: the tasks go to both
            ids = [mod.hang.delay(600).id for _ in range(HOST_TASKS)]
            if not wait_until(lambda: _all_in(backend, ids, "STARTED"), 30, 0.05):
                raise SystemExit(f"the tasks did not all start on alpha:\n{alpha.log_tail()}")
            beta = _worker(directory, env, 1, "-n", "beta@%h")
            time.sleep(1.0)
            os.killpg(alpha.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: _all_in(backend, ids, "FAILURE"), 60, 0.05)
            took = time.monotonic() - killed
            failed = sum(backend.stored_state(t) == "FAILURE" for t in ids)
        finally:
            alpha.stop(grace=0)
            if beta is not None:
                beta.stop(grace=5)
        return {"side": "celeriac", "broker": kind, "tasks": len(ids), "failed": failed,
                "seconds": took}


def run_hostloss_celery(args: argparse.Namespace, wait: float) -> dict[str, Any]:
    """Celery 5.7 on Redis, the same way: what its tasks' state is ``wait`` s later."""
    with project("redis", args) as (directory, setup, env, _mod):
        with open(os.path.join(directory, "lchost.py"), "w") as f:
            f.write(CELERY_TASKS)
        from celery import Celery

        app = Celery("lchost", broker=setup.broker, backend=setup.backend)
        app.conf.update(task_track_started=True)

        def worker(name: str) -> Started:
            w = Started([tool("celery"), "-A", "lchost", "worker", "-c", "2", "-n",
                         f"{name}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"],
                        cwd=directory, env=env, log_path=os.path.join(directory, f"{name}.log"))
            if not wait_until(lambda: "ready." in _read(w.log_path), 60):
                raise SystemExit(f"the Celery worker did not start:\n{w.log_tail()}")
            return w

        alpha, beta = worker("alpha"), None
        try:
            ids = [app.send_task("lchost.hang", (600,)).id for _ in range(2)]
            started = lambda: all(app.AsyncResult(t).state == "STARTED" for t in ids)  # noqa: E731
            if not wait_until(started, 30, 0.05):
                raise SystemExit(f"the tasks did not start on Celery:\n{alpha.log_tail()}")
            beta = worker("beta")
            time.sleep(1.0)
            os.killpg(alpha.pid, signal.SIGKILL)
            time.sleep(wait)
            found = Counter(app.AsyncResult(t).state for t in ids)
        finally:
            alpha.stop(grace=0)
            if beta is not None:
                beta.stop(grace=5)
            app.close()
        return {"side": "celery", "broker": "redis", "tasks": len(ids),
                "failed": found.get("FAILURE", 0), "states": dict(found), "waited": wait}


def run_countdown(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with project(kind, args) as (directory, setup, env, mod):
        worker = _worker(directory, env, 0)
        try:
            assert mod.later.delay(0).get(timeout=30) == 0
            before, processes = rss_mb(worker.pid)
            began = time.monotonic()
            ids = [mod.later.apply_async((i,), countdown=3600).id
                   for i in range(args.countdown_n)]
            sent = time.monotonic() - began
            if kind == "redis":
                assert setup.redis is not None
                wait_until(lambda: setup.redis.client.llen("celery") == 0, 600, 0.5)
            wait_until(lambda: _read(worker.log_path).count("kept in the broker")
                       >= args.countdown_n if kind != "sqlite" else True, 600, 1.0)
            time.sleep(2)
            after, _ = rss_mb(worker.pid)
            began = time.monotonic()
            mod.app.control.revoke(ids)
            revoke = time.monotonic() - began
            time.sleep(3)  # the workers hear the broadcast and keep the ids
            after_revoke, _ = rss_mb(worker.pid)
            revoked = sum(1 for t in ids[:: max(1, len(ids) // 1000)]
                          if mod.app.backend.stored_state(t) == "REVOKED")
        finally:
            worker.stop()
        return {"broker": kind, "tasks": len(ids), "processes": processes,
                "rss_before": before, "rss_after": after, "rss_after_revoke": after_revoke,
                "send_seconds": sent,
                "revoke_seconds": revoke, "revoked_sampled": revoked,
                "sampled": len(ids[:: max(1, len(ids) // 1000)])}


LABEL = {"sqlite": "embedded SQLite", "redis": "Redis + Redis results",
         "amqp": "RabbitMQ + Redis results"}


def render(kills: list[dict[str, Any]], hostloss: list[dict[str, Any]],
           countdown: list[dict[str, Any]]) -> str:
    lines = [
        "## Task lifecycle: worker kills and delayed tasks",
        "",
        f"Measured {today()} with `{command_line()}`;",
        machine_line(("celeriac",)) + ".",
        "",
        "Worker SIGKILLed (whole process group) three times while it runs `acks_late` "
        "tasks of 50 ms, `-c 2`, and started again each time:",
        "",
        "| broker | tasks | lost | SUCCESS written twice | body ran again (killed mid-run) "
        "| skipped: SUCCESS already stored | all done in s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in kills:
        lines.append(f"| {LABEL[r['broker']]} | {r['tasks']:,} | {r['lost']} | "
                     f"{r['double_success']} | {r['ran_again']} | {r['skipped']} | "
                     f"{r['seconds']:.1f} |")
    lines += [
        "",
        "A worker (`-c 2`, heartbeats every 2 s) running early-acked tasks that take "
        "minutes is SIGKILLed whole, supervisor included, as when its machine dies; "
        "another worker is up:",
        "",
        "| side | broker | tasks running | became FAILURE (WorkerLostError) "
        "| last one, s after the kill |",
        "|---|---|---:|---:|---:|",
    ]
    for r in hostloss:
        if r["side"] == "celeriac":
            lines.append(f"| celeriac | {LABEL[r['broker']]} | {r['tasks']} | {r['failed']} | "
                         f"{r['seconds']:.1f} |")
        else:
            shown = ", ".join(f"{n} {s}" for s, n in sorted(r["states"].items()))
            lines.append(f"| Celery 5.7 | {LABEL[r['broker']]} | {r['tasks']} | {r['failed']} "
                         f"| never: {shown} {r['waited']:.0f} s after the kill |")
    lines += [
        "",
        "Tasks with a one-hour countdown sent to a running worker (`-c 2`); its memory "
        "before and after, and one `app.control.revoke(ids)` of them all:",
        "",
        "| broker | tasks | worker RSS before, MB | after, MB | sent in s | revoke all, s "
        "| REVOKED (sampled) | RSS after the revoke, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in countdown:
        lines.append(f"| {LABEL[r['broker']]} | {r['tasks']:,} | {r['rss_before']:.0f} | "
                     f"{r['rss_after']:.0f} | {r['send_seconds']:.1f} | "
                     f"{r['revoke_seconds']:.1f} | {r['revoked_sampled']}/{r['sampled']} | "
                     f"{r['rss_after_revoke']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", nargs="*", default=["sqlite", "redis", "amqp"],
                        choices=["sqlite", "redis", "amqp"])
    parser.add_argument("--hostloss", nargs="*", default=["sqlite", "redis", "amqp"],
                        choices=["sqlite", "redis", "amqp"])
    parser.add_argument("--no-celery", action="store_true",
                        help="skip Celery's host-loss run")
    parser.add_argument("--countdown", nargs="*", default=["sqlite", "redis"],
                        choices=["sqlite", "redis", "amqp"])
    parser.add_argument("--kills-n", type=int, default=1000)
    parser.add_argument("--countdown-n", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=180.0)
    add_server_args(parser)
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    kills = [run_kills(k, args) for k in args.kills]
    for r in kills:
        print(r)
    hostloss = [run_hostloss(k, args) for k in args.hostloss]
    if not args.no_celery:
        slowest = max((r["seconds"] for r in hostloss), default=12.0)
        hostloss.append(run_hostloss_celery(args, slowest + 60))
    for r in hostloss:
        print(r)
    countdown = [run_countdown(k, args) for k in args.countdown]
    for r in countdown:
        print(r)
    text = render(kills, hostloss, countdown)
    print(text)
    if args.write:
        write_section("lifecycle", text)


if __name__ == "__main__":
    main()
