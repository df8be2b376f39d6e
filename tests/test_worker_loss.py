"""Worker loss with real kills: a worker process SIGKILLed while running early-acked
tasks fails them with WorkerLostError (on each broker); a whole worker killed at once
(as when its host dies) has them failed by another worker or by itself restarted,
through heartbeats; and an acks_late task that stored SUCCESS is not run again when
its message comes back."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import time

import pytest
import redis

from celeriac import Celery, states
from celeriac.backends.base import Roster
from celeriac.exceptions import WorkerLostError
from celeriac.protocol import build_task_message, encode_envelope

from .conftest import Worker, write_module

TASKS = """
import asyncio
import os
import time
from celeriac import Celery

app = Celery('losstasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'])


@app.task
def slow(seconds):
    time.sleep(seconds)
    return 'finished'


@app.task
async def async_slow(seconds):
    await asyncio.sleep(seconds)
    return 'finished'


@app.task(acks_late=True)
async def async_slow_late(seconds):
    await asyncio.sleep(seconds)
    return 'finished'


@app.task(acks_late=True)
def append_slowly(path, seconds):
    with open(path, 'a') as f:
        f.write('ran\\n')
    time.sleep(seconds)
    return 'appended'


@app.task(acks_late=True)
def append(path):
    with open(path, 'a') as f:
        f.write('ran\\n')
    return 'appended'
"""


@pytest.fixture
def losstasks(broker_env, project):
    write_module(project, "losstasks", TASKS)
    return importlib.import_module("losstasks")


def _states(result):
    return [h["state"] for h in result.history]


def test_a_killed_process_fails_its_running_tasks_with_worker_lost_error(
        losstasks, broker_env, project, workers):
    worker = Worker(project, "losstasks", env=broker_env, concurrency=1)
    workers.append(worker)
    running = [losstasks.slow.delay(30), losstasks.async_slow.delay(30)]
    deadline = time.monotonic() + 15
    while not all(states.RECEIVED in _states(r) for r in running):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [pid] = worker.child_pids()
    os.kill(pid, signal.SIGKILL)
    for r in running:
        with pytest.raises(WorkerLostError, match="signal 9"):
            r.get(timeout=20)  # at once, not when their 30 s would have ended
        assert r.state == states.FAILURE
        assert _states(r) == [states.PENDING, states.RECEIVED, states.FAILURE]
        assert r.history[-1]["meta"]["pid"] == pid
    worker.wait_for_log("starting a new one")
    done = [losstasks.slow.delay(0) for _ in range(5)]
    assert [r.get(timeout=20) for r in done] == ["finished"] * 5
    assert worker.stop() == 0
    # a warm stop right after tasks finished loses none of them
    assert worker.log.count("WorkerLostError") == 2, worker.log


def test_a_task_that_succeeded_is_not_run_again_when_delivered_again(project, redis_url,
                                                                     monkeypatch, workers):
    """The worker died after storing SUCCESS and before acking: the message comes back
    (marked redelivered, as the Redis transport restores it) and is acked unrun."""
    env = {"TEST_BROKER": redis_url, "TEST_BACKEND": redis_url, "TEST_QUEUE": "celery"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    write_module(project, "losstasks", TASKS)
    tasks = importlib.import_module("losstasks")
    worker = Worker(project, "losstasks", env=env)
    workers.append(worker)
    path = str(project / "runs")
    r = tasks.append.delay(path)
    assert r.get(timeout=20) == "appended"

    again = build_task_message("losstasks.append", [path], {}, task_id=r.id, queue="celery",
                               serializer="json")
    again.properties["delivery_info"] = {"exchange": "", "routing_key": "celery",
                                         "redelivered": True}
    redis.Redis.from_url(redis_url).lpush("celery", encode_envelope(again))
    worker.wait_for_log(f"Task losstasks.append[{r.id}] succeeded already: not run again")
    fresh = tasks.append.delay(path)  # a new task with the same body does run
    assert fresh.get(timeout=20) == "appended"
    with open(path) as f:
        assert f.read() == "ran\nran\n"
    assert _states(r).count(states.SUCCESS) == 1


BROKEN_WRITER = """
import os
from celeriac import Celery
from celeriac.worker.writer import Writer

app = Celery('brokenwriter', broker=os.environ['TEST_BROKER'])
# what the dead process had fetched and not started comes back soon
app.conf.broker_transport_options = {'visibility_timeout': 2}
_real_write = Writer._write
_batches = [0]


async def _write(self, records, acks, roster):  # a bug in the writer, injected once
    _batches[0] += 1
    if _batches[0] == 2 and not os.path.exists('broke'):
        open('broke', 'w').close()
        raise RuntimeError('writer broken on purpose')
    return await _real_write(self, records, acks, roster)


Writer._write = _write


@app.task
def add(x, y):
    return x + y
"""


def test_a_process_whose_writer_fails_is_replaced_and_leaves_nothing_hanging(
        project, monkeypatch, workers):
    """A bug that ends a process's writer would leave its tasks' results unwritten for
    ever: the process exits at once instead, the supervisor fails its running tasks
    (WorkerLostError) and starts a new process, which runs the rest (what the dead one
    had fetched comes back when its lease lapses)."""
    monkeypatch.setenv("TEST_BROKER", f"sqlite:///{project}/tasks.db")
    write_module(project, "brokenwriter", BROKEN_WRITER)
    tasks = importlib.import_module("brokenwriter")
    worker = Worker(project, "brokenwriter", concurrency=1)
    workers.append(worker)
    assert tasks.add.delay(1, 1).get(timeout=20) == 2
    rs = [tasks.add.delay(i, i) for i in range(10)]
    outcomes = []
    for r in rs:
        try:
            outcomes.append(r.get(timeout=20))
        except WorkerLostError:
            outcomes.append("lost")
    assert "lost" in outcomes, outcomes
    assert all(o in ("lost", 2 * i) for i, o in enumerate(outcomes)), outcomes
    worker.wait_for_log("exited with exit code 4; starting a new one")
    assert "the writer of this worker process failed" in worker.log
    assert tasks.add.delay(2, 2).get(timeout=20) == 4  # the new process's writer works
    assert worker.stop() == 0


# --------------------------------------------------------------------------- lost hosts

#: Heartbeat interval in these tests: a worker is lost after 5 of them (1 s).
BEAT = "0.2"


def _wait_received(results, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not all(states.RECEIVED in _states(r) for r in results):
        assert time.monotonic() < deadline, [_states(r) for r in results]
        time.sleep(0.02)


def test_a_lost_host_s_tasks_are_failed_by_another_worker(losstasks, broker_env, project,
                                                          workers):
    """The whole of worker alpha is SIGKILLed at once (supervisor included, so nothing
    of it is left to notice): worker beta sees its heartbeat stop and fails the early-
    acked tasks it was running.  Its acks_late task is left to the broker to deliver
    again, and a live worker's tasks are never taken for lost."""
    alpha = Worker(project, "losstasks", "-n", "alpha@%h", "--heartbeat-interval", BEAT,
                   env=broker_env, concurrency=1)
    workers.append(alpha)
    early = [losstasks.slow.delay(60), losstasks.async_slow.delay(60)]
    late = losstasks.async_slow_late.delay(6)
    _wait_received([*early, late])
    beta = Worker(project, "losstasks", "-n", "beta@%h", "--heartbeat-interval", BEAT,
                  env=broker_env, concurrency=1)
    workers.append(beta)
    time.sleep(2.0)  # ten heartbeats: alpha is alive, nothing of it is failed
    assert [r.state for r in early] == [states.PENDING, states.PENDING]

    alpha.kill_all()
    for r in early:
        # lost after 5 beats (1 s), found at beta's next beat: long before the tasks end
        with pytest.raises(WorkerLostError, match=r"Worker alpha@\S+ sent no heartbeat"):
            r.get(timeout=20)
        assert _states(r) == [states.PENDING, states.RECEIVED, states.FAILURE]
        end = r.history[-1]
        assert end["hostname"].startswith("beta@")
        assert end["meta"]["lost_node"].startswith("alpha@")
    assert states.FAILURE not in _states(late)
    beta.wait_for_log("failing the 2 tasks it was running")
    if broker_env["TEST_BROKER"].startswith("amqp"):  # RabbitMQ gives it back at once
        assert late.get(timeout=20) == "finished"
        assert late.history[-1]["hostname"].startswith("beta@")
    assert beta.stop() == 0


def _wait_running(path) -> None:
    """Until ``append_slowly`` has written its line: the task runs."""
    deadline = time.monotonic() + 30
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_lost_host_s_acks_late_task_runs_again_soon(losstasks, broker_env, project,
                                                      workers):
    """A whole worker is SIGKILLed while an acks_late task runs; another worker, started
    afterwards, runs it again to SUCCESS.  Redis keeps the message in ``unacked`` for
    the visibility timeout (an hour here, far beyond the deadline): the worker that
    takes the lost node over puts it back at once.  RabbitMQ redelivers it when the
    connection drops; SQLite's lease lapses (30 s by default)."""
    path = project / "runs"
    alpha = Worker(project, "losstasks", "-n", "alpha@%h", "--heartbeat-interval", BEAT,
                   env=broker_env, concurrency=1)
    workers.append(alpha)
    r = losstasks.append_slowly.delay(str(path), 2)
    _wait_running(path)
    alpha.kill_all()
    if broker_env["TEST_BROKER"].startswith("redis"):
        client = redis.Redis.from_url(broker_env["TEST_BROKER"])
        assert client.hlen("unacked") == 1  # held by the dead node
    beta = Worker(project, "losstasks", "-n", "beta@%h", "--heartbeat-interval", BEAT,
                  env=broker_env, concurrency=1)
    workers.append(beta)
    assert r.get(timeout=90) == "appended"
    assert path.read_text() == "ran\nran\n"
    assert r.history[-1]["hostname"].startswith("beta@")
    assert beta.stop() == 0


def test_a_killed_process_s_acks_late_task_runs_again_soon(losstasks, broker_env, project,
                                                           workers):
    """One worker process is SIGKILLed (as the OOM killer does) while an acks_late task
    runs: on Redis its supervisor puts the message back at once (not after the hour of
    the visibility timeout), and the process started in its place runs it to SUCCESS."""
    path = project / "runs"
    worker = Worker(project, "losstasks", "--heartbeat-interval", BEAT, env=broker_env,
                    concurrency=1)
    workers.append(worker)
    r = losstasks.append_slowly.delay(str(path), 2)
    _wait_running(path)
    (child,) = worker.child_pids()
    os.kill(child, signal.SIGKILL)
    assert r.get(timeout=90) == "appended"
    assert path.read_text() == "ran\nran\n"
    assert worker.stop() == 0


def test_a_worker_started_again_fails_what_it_ran_before_it_was_lost(
        losstasks, broker_env, project, workers):
    """Alone on its host, a worker is killed whole right after a task started (before
    its next heartbeat) and started again: it fails that task, and only that one (the
    tasks that finished left its roster)."""
    args = ("-n", "alpha@%h", "--heartbeat-interval", BEAT)
    first = Worker(project, "losstasks", *args, env=broker_env, concurrency=1)
    workers.append(first)
    done = [losstasks.slow.delay(0) for _ in range(5)]
    assert [r.get(timeout=20) for r in done] == ["finished"] * 5
    running = losstasks.async_slow.delay(60)
    _wait_received([running])
    first.kill_all()

    again = Worker(project, "losstasks", *args, env=broker_env, concurrency=1)
    workers.append(again)
    with pytest.raises(WorkerLostError, match="sent no heartbeat"):
        running.get(timeout=10)
    again.wait_for_log("failing the 1 tasks it was running")
    assert [r.state for r in done] == [states.SUCCESS] * 5
    assert losstasks.slow.delay(0).get(timeout=20) == "finished"
    assert again.stop() == 0
    # a clean stop takes the worker's heartbeat away: no one will take it for lost
    assert losstasks.app.backend.stale_nodes(time.time() + 3600) == {}


def _claim(url: str, node: str, barrier, out) -> None:
    app = Celery("claims", broker="memory://", backend=url)
    barrier.wait()
    out.put(app.backend.claim_node(node, 150.0, 300.0))


@pytest.mark.parametrize("kind", ["sqlite", "file", "redis"])
def test_heartbeat_store_claims_a_lost_node_once(kind, tmp_path, request):
    """The store side of heartbeats: rosters follow started/ended, a stale node is
    claimed by exactly one of four racing processes, and forget_node removes it."""
    url = {"sqlite": f"sqlite:///{tmp_path}/results.db", "file": f"file://{tmp_path}/results",
           "redis": request.getfixturevalue("redis_url") if kind == "redis" else ""}[kind]
    app = Celery("claims", broker="memory://", backend=url)
    backend = app.backend
    assert backend.keeps_heartbeats
    lost, alive = "alpha@h:11:aaaaaa", "beta@h:22:bbbbbb"
    backend.heartbeat(lost, 100.0)
    backend.heartbeat(alive, 200.0)
    backend.record([], Roster(lost, ["t1", "t2", "t3"]))
    backend.record([], Roster(lost, (), ["t2"]))
    backend.record([], Roster(alive, ["t9"]))
    assert backend.stale_nodes(150.0) == {lost: 100.0}

    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(url, lost, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    claims = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(claims, key=lambda c: c is None) == [["t1", "t3"], None, None, None]
    assert backend.stale_nodes(150.0) == {}  # claimed: its heartbeat moved to 300
    backend.forget_node(lost)
    assert backend.stale_nodes(1e12) == {alive: 200.0}
    assert backend.claim_node(alive, 150.0, 300.0) is None  # not stale
    assert backend.claim_node(alive, 250.0, 300.0) == ["t9"]
    app.close()
