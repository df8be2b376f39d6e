"""Real server restarts, each on a private server of the test's own (tests/servers.py):
a worker ``-c 2`` runs short tasks (half ``acks_late``) while the broker or result store
is stopped for a few seconds and started again.  Every task ends SUCCESS, none FAILURE,
each ran (an ``acks_late`` one at most twice), the client's reads come back by
themselves, and a client started after the restart gets its result.

Run as a script for the full-size figures (not part of the suite)::

    python -m tests.test_restarts rpc|redis [tasks] [outage seconds]
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import Worker, amqp_connection, write_module
from .servers import PrivateRabbit, PrivateRedis

TASKS = """
import os, time
from celeriac import Celery

app = Celery('rtasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
# no publish retries: a producer whose connection the restart dropped reconnects anyway
app.conf.task_publish_retry = False


def _ran(i):
    with open(os.environ['TEST_RUNS'], 'a') as f:  # one short line: appended whole
        f.write(f'{i}\\n')


@app.task
def work(i):
    _ran(i)
    time.sleep(0.02)
    return i


@app.task(acks_late=True)
def work_late(i):
    _ran(i)
    time.sleep(0.02)
    return i
"""

LATE_CLIENT = """
import sys
import rtasks
print('RESULT', rtasks.work_late.delay(-1).get(timeout=float(sys.argv[1])))
"""


def _wait(condition: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.05)


def scenario(project: Path, server: PrivateRabbit | PrivateRedis, env: dict[str, str],
             tasks: int, outage: float, setenv: Any, deadline: float = 300.0) -> dict[str, Any]:
    """Send ``tasks`` tasks (odd ones ``acks_late``), stop ``server`` once a fifth of them
    has run, read every state while it is away, start it again, and wait for them all.
    Returns what was seen (see the tests for what must hold)."""
    runs = project / "runs.txt"
    env = dict(env, TEST_RUNS=str(runs))
    for k, v in env.items():
        setenv(k, v)
    write_module(project, "rtasks", TASKS)
    write_module(project, "late_client", LATE_CLIENT)
    rtasks = importlib.import_module("rtasks")
    worker = Worker(project, "rtasks", env=env, concurrency=2)
    try:
        results = [(rtasks.work_late if i % 2 else rtasks.work).delay(i) for i in range(tasks)]
        started = time.monotonic()
        _wait(lambda: runs.exists() and len(runs.read_text().split()) >= tasks // 5,
              "a fifth of the tasks ran", deadline)
        server.stop()
        stopped = time.monotonic()
        read_errors: Counter[str] = Counter()
        reads = 0
        while time.monotonic() - stopped < outage:
            for r in results:
                reads += 1
                try:
                    r.state  # noqa: B018 - the read is the point
                except Exception as exc:
                    read_errors[repr(exc)] += 1
        server.start()
        restarted = time.monotonic()
        final: dict[str, str] = {}
        errors_after: Counter[str] = Counter()

        def all_ready() -> bool:
            for r in results:
                if r.id in final:
                    continue
                try:
                    state = r.state
                except Exception as exc:
                    errors_after[repr(exc)] += 1
                    return False
                if state in ("SUCCESS", "FAILURE", "REVOKED"):
                    final[r.id] = state
            return len(final) == len(results)

        with contextlib.suppress(AssertionError):  # reported below
            _wait(all_ready, "every task ready", deadline)
        done = time.monotonic()
        try:  # the client's own connections were idle through the restart
            again = rtasks.work_late.delay(-2).get(timeout=deadline / 2)
        except Exception as exc:
            again = exc
        late = subprocess.run([sys.executable, "late_client.py", str(deadline / 2)],
                              cwd=project, env=dict(os.environ, **env), capture_output=True,
                              text=True, timeout=deadline)
    finally:
        worker.stop(timeout=60)
    ran = Counter(int(x) for x in runs.read_text().split())
    return {
        "states": Counter(final.get(r.id, "NOT READY") for r in results),
        "failures": [(i, r.result) for i, r in enumerate(results) if final.get(r.id) == "FAILURE"],
        "never_ran": [i for i in range(tasks) if not ran[i]],
        "ran_twice_early": [i for i in range(0, tasks, 2) if ran[i] > 1],
        "ran_twice_late": [i for i in range(1, tasks, 2) if ran[i] > 1],
        "ran_more": [i for i in range(tasks) if ran[i] > 2],
        "reads_in_outage": reads, "read_errors_in_outage": dict(read_errors),
        "read_errors_after": dict(errors_after),
        "same_client_after": repr(again),
        "late_client": (late.returncode, late.stdout.strip(), late.stderr[-2000:]),
        "seconds_to_all_ready_after_restart": round(done - restarted, 2),
        "seconds_before_stop": round(stopped - started, 2),
        "worker_log": worker.log,
    }


def check(seen: dict[str, Any], tasks: int, early_acks_confirmed: bool) -> None:
    assert seen["states"] == {"SUCCESS": tasks}, (seen["states"], seen["failures"],
                                                   seen["worker_log"][-5000:])
    assert seen["never_ran"] == [] and seen["ran_more"] == [], seen
    if early_acks_confirmed:  # only acks_late tasks may run again
        assert seen["ran_twice_early"] == [], seen
    else:  # an AMQP ack is a one-way frame: one the restart swallowed is delivered again;
        # at most what a worker holds at once (2 processes x (prefetch 4 + 1))
        assert len(seen["ran_twice_early"]) <= 10, seen
    assert seen["same_client_after"] == "-2", seen
    assert seen["late_client"][:2] == (0, "RESULT -1"), seen["late_client"]


def test_rpc_results_survive_a_rabbitmq_restart(project, private_rabbit, monkeypatch):
    """The default setup with RabbitMQ (``rpc://`` results): both sides reconnect, and
    the states sent before and after the restart all reach the caller."""
    seen = scenario(project, private_rabbit, {"TEST_BROKER": private_rabbit.url}, 150, 5.0,
                    monkeypatch.setenv)
    check(seen, 150, early_acks_confirmed=False)


def test_a_redis_restart_fails_no_task(project, private_redis, monkeypatch):
    """Redis as broker and result store, restarted on its append-only file: no task is
    stored FAILURE for the lost connection, and each runs."""
    env = {"TEST_BROKER": private_redis.url, "TEST_BACKEND": private_redis.url}
    seen = scenario(project, private_redis, env, 150, 5.0, monkeypatch.setenv)
    check(seen, 150, early_acks_confirmed=True)


def test_a_delivery_of_a_lost_connection_is_not_started_early_acked(project, amqp_queue):
    """A message taken before the worker's connection dropped can no longer be acked:
    the worker does not start it unless it acks late (RabbitMQ delivers it again, and it
    would run twice)."""
    import asyncio

    from celeriac import Celery

    from .conftest import AMQP_URL

    app = Celery("held", broker=AMQP_URL, backend="memory://")
    app.conf.task_default_queue = amqp_queue
    app.send_task("held.task")

    async def main() -> tuple[bool, bool]:
        consumer = app.broker.consumer([amqp_queue], name="held-test", io=None)  # type: ignore[arg-type]
        try:
            taken: list[Any] = []
            while not taken:
                taken = await consumer.get(1, timeout=1.0)
            before = consumer.holds(taken[0])
            await consumer._connection.close()  # type: ignore[attr-defined]
            return before, consumer.holds(taken[0])
        finally:
            await consumer.close()

    assert asyncio.run(main()) == (True, False)


REPLY_CLIENT = """
import os, sys
from celeriac import Celery

app = Celery('client', broker=os.environ['TEST_BROKER'], backend='rpc://')
app.conf.task_default_queue = os.environ['TEST_QUEUE']
app.send_task('nobody.runs.this')
print(app.oid, flush=True)
if sys.argv[1] == 'killed':
    os._exit(0)  # as a killed process: no exit handlers
"""


def test_rpc_reply_queue_outlives_its_connection_not_its_process(project, amqp_queue):
    """The caller's reply queue is not auto-delete (a dropped connection, as in a broker
    restart, does not take it and the states sent to it meanwhile); a process that exits
    deletes it, and only one that is killed leaves it to ``x-expires``."""
    import amqp

    from .conftest import AMQP_URL

    write_module(project, "reply_client", REPLY_CLIENT)
    env = dict(os.environ, TEST_BROKER=AMQP_URL, TEST_QUEUE=amqp_queue)
    oids = {how: subprocess.run([sys.executable, "reply_client.py", how], cwd=project,
                                env=env, capture_output=True, text=True, check=True,
                                timeout=120).stdout.strip()
            for how in ("exits", "killed")}
    conn = amqp_connection()
    try:
        conn.channel().queue_declare(oids["killed"], passive=True)  # still there
        with pytest.raises(amqp.exceptions.NotFound):
            conn.channel().queue_declare(oids["exits"], passive=True)
    finally:
        for oid in oids.values():  # whatever this test left
            with contextlib.suppress(amqp.exceptions.AMQPError):
                conn.channel().queue_delete(oid)
        conn.collect()


if __name__ == "__main__":  # the full-size run, for figures
    import json
    import tempfile

    kind = sys.argv[1] if len(sys.argv) > 1 else "rpc"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 600
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    directory = Path(tempfile.mkdtemp(prefix="celeriac-restart-"))
    os.chdir(directory)
    sys.path.insert(0, str(directory))
    server: PrivateRabbit | PrivateRedis
    if kind == "rpc":
        server = PrivateRabbit()
        server.launch()
        env = {"TEST_BROKER": server.url}
    else:
        server = PrivateRedis()
        server.start()
        env = {"TEST_BROKER": server.url, "TEST_BACKEND": server.url}
    try:
        out = scenario(directory, server, env, n, pause, os.environ.__setitem__, deadline=600)
    finally:
        server.close()
    log = out.pop("worker_log")
    out["failures"] = [(i, repr(e)) for i, e in out["failures"]][:10]
    print(json.dumps(out, indent=1, default=str))
    print("worker log:", len(log), "chars; warnings:",
          sum(1 for line in log.splitlines() if "WARNING" in line))
