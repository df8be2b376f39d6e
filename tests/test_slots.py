"""No early-acked task starts unrecorded: a worker process notes each such task in a slot
its supervisor can read, and a task that finds every slot taken waits for one.  Killing
the process while thousands of short tasks stream through it must leave no task that
was received without an end."""

from __future__ import annotations

import importlib
import os
import signal
import time

from celeriac import states

from .conftest import Worker, wait_until, write_module

TASKS = """
import asyncio
import os
from celeriac import Celery

app = Celery('slottasks', broker=os.environ['TEST_BROKER'],
             backend=os.environ.get('TEST_BACKEND') or None)
app.conf.update(task_default_queue=os.environ['TEST_QUEUE'], worker_prefetch_multiplier=8)


@app.task
async def short(i):
    await asyncio.sleep(0.01)  # long enough that its start and end are written apart
    return i
"""

TOTAL = 1500


def _received_without_end(results) -> list[str]:
    """Ids of tasks a worker received whose history has no ready state."""
    stuck = []
    for r in results:
        seen = {h["state"] for h in r.history}
        if states.RECEIVED in seen and not seen & states.READY_STATES:
            stuck.append(r.id)
    return stuck


def test_killing_a_busy_process_leaves_no_received_task_without_an_end(
        broker_env, project, workers):
    write_module(project, "slottasks", TASKS)
    tasks = importlib.import_module("slottasks")
    worker = Worker(project, "slottasks", env=broker_env, concurrency=1)
    workers.append(worker)
    results = [tasks.short.delay(i) for i in range(TOTAL)]
    for kill, at in enumerate((TOTAL // 4, TOTAL // 2)):
        # kill the process while tasks stream through it
        wait_until(lambda at=at: states.RECEIVED in {h["state"] for h in results[at].history},
                   timeout=120, what=f"task {at} received")
        [pid] = wait_until(worker.child_pids, what="the worker process")
        os.kill(pid, signal.SIGKILL)
        worker.wait_for_log("starting a new one", count=kill + 1)
    # the process's early-acked tasks are failed by the supervisor at once; the ones
    # it only held come back from the broker in their own time (or stay queued)
    deadline = time.monotonic() + 60
    while (stuck := _received_without_end(results)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not stuck, f"{len(stuck)} tasks received with no end, e.g. {stuck[:3]}"
    assert worker.stop() == 0
