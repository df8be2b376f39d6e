"""The worker's main process: starts N worker processes, replaces any that die,
and turns SIGTERM/SIGINT into a warm shutdown (a second one kills the children)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from .. import states
from ..conf import masked_url
from ..exceptions import WorkerLostError
from ..protocol import exception_to_dict
from .consumer import run_process
from .execution import ActiveSlots

if TYPE_CHECKING:
    from ..app import Celeriac

log = logging.getLogger("celeriac.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: A child that dies sooner than this after starting is restarted only after this long.
RESPAWN_BACKOFF = 1.0


def setup_logging(loglevel: str) -> None:
    logging.basicConfig(level=loglevel.upper(), format=LOG_FORMAT, stream=sys.stderr,
                        force=True)


def broker_reachable(app: Celeriac) -> bool:
    """Whether the broker answers before the worker starts its processes.

    As Celery: with ``broker_connection_retry_on_startup`` (default: the value of
    ``broker_connection_retry``, True) a broker that is down is tried again with growing
    pauses, up to ``broker_connection_max_retries`` times (0 or None: for ever); with it
    False, the first failure stops the worker."""
    conf = app.conf
    retry = conf.broker_connection_retry_on_startup
    if retry is None:
        retry = conf.broker_connection_retry
    max_retries = conf.broker_connection_max_retries or None
    timeout = float(conf.broker_connection_timeout or 4.0)
    url = masked_url(app.broker_url)
    tries = 0
    while True:
        try:
            app.broker.ping(timeout)
            return True
        except Exception as exc:
            if not retry:
                log.critical("cannot connect to the broker %s: %r (not retried: "
                             "broker_connection_retry_on_startup is False)", url, exc)
                return False
            if max_retries is not None and tries >= max_retries:
                log.critical("cannot connect to the broker %s: %r; gave up after %d retries "
                             "(broker_connection_max_retries)", url, exc, tries)
                return False
            tries += 1
            pause = min(2.0 * tries, 30.0)
            log.error("cannot connect to the broker %s: %r; retry %d in %.0f s",
                      url, exc, tries, pause)
            time.sleep(pause)


def fail_lost_tasks(app: Celeriac, lost: list[tuple[str, str]], pid: int, how: str,
                    hostname: str) -> None:
    """Store FAILURE (WorkerLostError) for the early-acked tasks a dead worker process was
    running (a task that stored its end already keeps it: ready states are final)."""
    error = WorkerLostError(f"Worker exited prematurely: {how}.")
    backend = app.backend
    try:
        records = [backend.prepare_record(task_id, states.FAILURE, error, hostname=hostname,
                                          entry_meta={**exception_to_dict(error), "pid": pid})
                   for task_id, _ in lost]
        written = backend.record(records)
    except Exception as exc:
        log.error("could not store WorkerLostError for %d tasks of process %d: %r",
                  len(lost), pid, exc)
        return
    for (task_id, name), done in zip(lost, written, strict=True):
        if done:
            log.error("Task %s[%s] raised unexpected: WorkerLostError('Worker exited "
                      "prematurely: %s.')", name, task_id, how)


def run_worker(app: Celeriac, *, concurrency: int, queues: list[str], hostname: str) -> int:
    # pid -> (slot, started at, the tasks it runs)
    children: dict[int, tuple[int, float, ActiveSlots]] = {}
    stopping = False
    slots_per_process = max(1, int(app.conf.worker_prefetch_multiplier or 1)) + 1

    def spawn(slot: int) -> None:
        app.close()  # no connection may be shared across fork
        active = ActiveSlots(slots_per_process)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                multiprocessing.current_process().name = f"Worker-{slot}"
                run_process(app, queues, hostname, housekeeper=slot == 1, slots=active)
            except BaseException:
                log.exception("worker process crashed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (slot, time.monotonic(), active)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            log.warning("cold shutdown: killing %d worker processes", len(children))
            for pid in children:
                _kill(pid, signal.SIGKILL)
            return
        stopping = True
        log.warning("warm shutdown: finishing running tasks (signal again to kill them)")
        for pid in children:
            _kill(pid, signal.SIGTERM)

    if not broker_reachable(app):
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.warning("celeriac worker %s: %d processes, queues %s, broker %s, results %s",
                hostname, concurrency, ",".join(queues), masked_url(app.broker_url),
                masked_url(app.result_backend_url))
    for slot in range(1, concurrency + 1):
        spawn(slot)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot, started, active = children.pop(pid)
        lost = active.running()
        active.close()
        if lost:
            fail_lost_tasks(app, lost, pid, _describe(status), hostname)
        if stopping:
            continue
        log.error("worker process %d (Worker-%d) exited with %s; starting a new one",
                  pid, slot, _describe(status))
        if time.monotonic() - started < RESPAWN_BACKOFF:
            time.sleep(RESPAWN_BACKOFF)
        if not stopping:
            spawn(slot)
    return 0


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"signal {number} ({signal.Signals(number).name})"
    return f"exit code {os.WEXITSTATUS(status)}"
