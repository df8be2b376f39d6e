"""The embedded store's recovery from a lost worker host, repeated: a whole worker
(supervisor and both processes) is SIGKILLed while an acks_late task and an early-acked
task run, at a different moment each round, and a new worker is started.  Every round
must end with both tasks ended: the acks_late one run again once its lease lapses, the
early-acked one failed (WorkerLostError) through the lost node's heartbeat, or run if
the kill came before any worker took it."""

from __future__ import annotations

import importlib
import random

from celeriac import states

from .conftest import Worker, wait_until, write_module

TASKS = """
import asyncio
import time
from celeriac import Celery

app = Celery('hostloss')
app.conf.update(task_track_started=True,
                broker_transport_options={'visibility_timeout': 1.5})


@app.task(acks_late=True)
def late(seconds):
    time.sleep(seconds)
    return 'late'


@app.task
def early(seconds):
    time.sleep(seconds)
    return 'early'


@app.task(acks_late=True)
async def async_late(seconds):
    await asyncio.sleep(seconds)
    return 'late'


@app.task
async def async_early(seconds):
    await asyncio.sleep(seconds)
    return 'early'
"""

ROUNDS = 6


def test_every_round_of_host_loss_ends_both_tasks(project, workers):
    write_module(project, "hostloss", TASKS)
    tasks = importlib.import_module("hostloss")
    chance = random.Random(20261130)
    for round_ in range(ROUNDS):
        pair = ((tasks.late, tasks.early) if round_ % 2 else
                (tasks.async_late, tasks.async_early))
        # kill at a different point each round: before, while or after they start
        moment = chance.choice([states.PENDING, states.RECEIVED, states.STARTED])
        _round(project, workers, pair, moment, f"round {round_} (killed at {moment})")
        for w in workers:
            w.stop()
        workers.clear()


def _round(project, workers, pair, moment: str, what: str) -> None:
    worker = Worker(project, "hostloss", "--heartbeat-interval", "0.2", concurrency=2)
    workers.append(worker)
    late, early = (t.delay(0.5) for t in pair)
    wait_until(lambda: all(moment in [h["state"] for h in r.history] for r in (late, early)),
               timeout=60, what=f"{what}: both tasks {moment}")
    worker.kill_all()
    workers.append(Worker(project, "hostloss", "--heartbeat-interval", "0.2", concurrency=2))
    wait_until(lambda: late.ready() and early.ready(), timeout=90,
               what=f"{what}: both tasks ended")
    assert late.state == states.SUCCESS, late.history
    assert early.state in (states.SUCCESS, states.FAILURE), early.history
    if early.state == states.FAILURE:
        assert "WorkerLostError" in str(early.history[-1]["meta"])
