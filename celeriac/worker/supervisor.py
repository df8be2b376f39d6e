"""The worker's main process: starts N worker processes, replaces any that die,
and turns SIGTERM/SIGINT into a warm shutdown (a second one kills the children)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import signals
from ..backends.base import Roster
from ..brokers.base import GivesBackLostNodes
from ..conf import masked_url
from ..exceptions import WorkerLostError
from .execution import ActiveSlots
from .heartbeat import DEFAULT_INTERVAL, Heart, node_id, store_lost
from .process import run_process

if TYPE_CHECKING:
    from ..app import Celeriac

log = logging.getLogger("celeriac.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
#: A child that dies sooner than this after starting is restarted only after this long.
RESPAWN_BACKOFF = 1.0


def setup_logging(loglevel: str) -> None:
    """The worker's logging, as Celery sets it up: a ``setup_logging`` receiver takes
    it over entirely; otherwise the root logger writes to stderr, and then
    ``after_setup_logger`` / ``after_setup_task_logger`` may adjust it."""
    level = logging.getLevelName(loglevel.upper())
    options = {"loglevel": level, "logfile": None, "format": LOG_FORMAT, "colorize": False}
    if signals.setup_logging.send(sender=None, **options):
        return
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    signals.after_setup_logger.send(sender=None, logger=logging.getLogger(), **options)
    signals.after_setup_task_logger.send(sender=None, logger=logging.getLogger("celery.task"),
                                         **options)


class WorkerNode:
    """What the worker signals' ``sender`` is (Celery's WorkController): a worker node,
    one supervisor and its processes."""

    def __init__(self, app: Celeriac, hostname: str, concurrency: int,
                 queues: list[str]) -> None:
        self.app = app
        self.hostname = hostname
        self.concurrency = concurrency
        self.queues = queues
        self.pid = os.getpid()

    def __repr__(self) -> str:
        return f"<WorkerNode {self.hostname} ({self.concurrency} processes)>"


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


def run_worker(app: Celeriac, *, concurrency: int, queues: list[str], hostname: str,
               heartbeat_interval: float = DEFAULT_INTERVAL,
               options: dict[str, Any] | None = None) -> int:
    worker = WorkerNode(app, hostname, concurrency, queues)
    signals.celeryd_init.send(sender=hostname, instance=worker, conf=app.conf,
                              options=dict(options or {}))
    # pid -> (slot, started at, the tasks it runs)
    children: dict[int, tuple[int, float, ActiveSlots]] = {}
    respawn: dict[int, float] = {}  # slot -> when to start its next process (monotonic)
    stopping = False
    prefetch = max(1, int(app.conf.worker_prefetch_multiplier or 1))
    node = node_id(hostname)
    heart = (Heart(app, node, hostname, heartbeat_interval)
             if app.backend.keeps_heartbeats else None)

    def spawn(slot: int) -> None:
        signals.worker_before_create_process.send(sender=worker)
        app.close()  # no connection may be shared across fork
        active = ActiveSlots.for_prefetch(prefetch)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                os.close(wake_r)
                os.close(wake_w)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                multiprocessing.current_process().name = f"Worker-{slot}"
                broker = app.broker
                if heart is not None and isinstance(broker, GivesBackLostNodes):
                    broker.node = node  # so a peer can give back what it holds if lost
                run_process(app, queues, hostname, housekeeper=slot == 1, slots=active,
                            node=node if heart is not None else None)
            except BaseException:
                log.exception("worker process crashed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (slot, time.monotonic(), active)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        how = "Cold" if stopping else "Warm"
        signals.worker_shutting_down.send(sender=hostname, sig=signal.Signals(signum).name,
                                          how=how, exitcode=1 if stopping else 0)
        if stopping:
            log.warning("cold shutdown: killing %d worker processes", len(children))
            for pid in children:
                _kill(pid, signal.SIGKILL)
            return
        stopping = True
        log.warning("warm shutdown: finishing running tasks (signal again to kill them)")
        for pid in children:
            _kill(pid, signal.SIGTERM)

    def exited(pid: int, status: int) -> None:
        slot, started, active = children.pop(pid)
        lost = active.running()
        active.close()
        how = _describe(status)
        if lost:
            store_lost(app, lost, WorkerLostError(f"Worker exited prematurely: {how}."),
                       hostname, {"pid": pid},
                       None if heart is None else Roster(node, (), [t for t, _ in lost]))
        if heart is not None:
            heart.give_back(f"{node}/{pid}")  # its acks_late and prefetched messages
        if stopping:
            return
        log.error("worker process %d (Worker-%d) exited with %s; starting a new one",
                  pid, slot, how)
        respawn[slot] = max(time.monotonic(), started + RESPAWN_BACKOFF)

    if not broker_reachable(app):
        return 1
    signals.worker_init.send(sender=worker)
    # SIGCHLD, SIGTERM and SIGINT wake the loop through this pipe (between heartbeats)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    next_beat = time.monotonic()
    if heart is not None:
        # registered before any process notes a task in its roster
        if not heart.register(lambda: stopping):
            return 1
        heart.beat()
        next_beat += heartbeat_interval
    for slot in range(1, concurrency + 1):
        spawn(slot)
    log.warning("celeriac worker %s: %d processes, queues %s, broker %s, results %s",
                hostname, concurrency, ",".join(queues), masked_url(app.broker_url),
                masked_url(app.result_backend_url))
    signals.worker_ready.send(sender=worker)
    try:
        while children or (respawn and not stopping):
            while children:  # reap every process that exited
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in children:
                    exited(pid, status)
            now = time.monotonic()
            for slot, when in list(respawn.items()):
                if stopping:
                    respawn.clear()
                elif when <= now:
                    del respawn[slot]
                    spawn(slot)
            if heart is not None and now >= next_beat:
                heart.beat()
                signals.heartbeat_sent.send(sender=heart)
                next_beat = time.monotonic() + heartbeat_interval
            if not children and not respawn:
                break
            wake = min([*respawn.values(), next_beat if heart is not None else now + 60.0])
            with contextlib.suppress(InterruptedError):
                select.select([wake_r], [], [], max(0.0, wake - time.monotonic()))
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 512):
                    pass
    finally:
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    if heart is not None:
        heart.stop()
    signals.worker_shutdown.send(sender=worker)
    return 0


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"signal {number} ({signal.Signals(number).name})"
    return f"exit code {os.WEXITSTATUS(status)}"
