"""Run a worker inside the current process, for tests (the only way to serve ``memory://``).

    with start_worker(app):
        assert add.delay(2, 3).get(timeout=5) == 5
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from .worker.execution import TaskThread
from .worker.process import WorkerProcess

if TYPE_CHECKING:
    from .app import Celeriac


@contextlib.contextmanager
def start_worker(app: Celeriac, queues: Sequence[str] | None = None,
                 hostname: str | None = None) -> Iterator[WorkerProcess]:
    """A worker process's loop on a background thread; stopped warmly on exit."""
    qs = list(queues or [app.conf.task_default_queue])
    process_holder: list[WorkerProcess] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    task_thread = TaskThread()  # served on a thread of its own: no time limits here
    threading.Thread(target=task_thread.serve, name="celeriac-test-tasks", daemon=True).start()

    async def main() -> None:
        process = WorkerProcess(app, qs, hostname or f"testworker@{socket.gethostname()}",
                                task_thread)
        process_holder.append(process)
        ready.set()
        await process.run()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),),
                              name="celeriac-test-worker", daemon=True)
    thread.start()
    ready.wait(10)
    process = process_holder[0]
    try:
        yield process
    finally:
        loop.call_soon_threadsafe(process.stopping.set)
        thread.join(30)
        loop.close()
        task_thread.shutdown()
