"""Walk through the seed scenario (Celery's states, custom states, file results) on
celeriac's embedded default: no server, one SQLite file per example directory.

    python examples/demo.py            # all three programs
    python examples/demo.py states     # just one: states | custom_states | file_results

Each program is run as its author ran it: a REPL-like session imports ``task`` from
the example's directory while a worker (``celeriac -A task worker``) is started and
stopped beside it.  EXAMPLE_SLEEP (default 3) shortens the tasks' ``time.sleep(10)``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def show(code: str, value: object = None, *, quiet: bool = False) -> None:
    print(f">>> {code}")
    if not quiet and value is not None:
        print(repr(value))


def start_worker(directory: Path) -> subprocess.Popen[bytes]:
    print(f"$ celeriac -A task worker -c 2 -l info    # started in {directory.name}/")
    proc = subprocess.Popen([sys.executable, "-m", "celeriac", "-A", "task", "worker", "-c", "2",
                             "-l", "info"], cwd=directory, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait for the banner, then let the log flow to our stderr
        sys.stderr.write("    | " + line.decode())
        if b"celeriac worker" in line:
            break
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[1]
    for line in out.decode().splitlines():
        sys.stderr.write("    | " + line + "\n")


def watch(result, until: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Print r.status each time it changes, as someone typing r.status would see it."""
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = result.status
        if status != last:
            show("r.status", status)
            last = status
        if status == until:
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: {result.id} did not reach {until}")


def history_table(task_id: str, directory: Path) -> None:
    print(f"$ celeriac -A task result {task_id}")
    subprocess.run([sys.executable, "-m", "celeriac", "-A", "task", "result", task_id],
                   cwd=directory, check=True)


def session(name: str) -> None:
    directory = HERE / name
    os.chdir(directory)
    sys.path.insert(0, str(directory))
    for stale in directory.glob("celeriac.db*"):
        stale.unlink()
    if name == "file_results":
        os.environ.setdefault("EXAMPLE_RESULTS", f"file://{directory / 'results'}")
    task = importlib.import_module("task")
    add = task.add
    print(f"\n=== examples/{name}/task.py ===")
    print(f"broker: {task.app.broker_url}   results: {task.app.result_backend_url}\n")

    if name == "states":
        r = add.delay(2, 3)
        show("r = add.delay(2, 3)  # worker is not running yet, so the state is PENDING")
        show("r.status", r.status)
        show("r.exists()  # known: it was sent (an unknown id says False)", r.exists())
        worker = start_worker(directory)
        try:
            watch(r, "SUCCESS")
            show("r.get()", r.get(timeout=60))
            r = add.delay(2, "a")
            show("r = add.delay(2, 'a')")
            watch(r, "FAILURE")
            show("r.state", r.state)
            try:
                r.get(timeout=5)
            except TypeError as exc:
                show("r.get()")
                print(f"TypeError: {exc}")
        finally:
            stop_worker(worker)
        history_table(r.id, directory)
    elif name == "custom_states":
        worker = start_worker(directory)
        try:
            r = add.delay(2, 3)
            show("r = add.delay(2, 3)")
            watch(r, "SUCCESS")
        finally:
            stop_worker(worker)
        history_table(r.id, directory)
    else:
        worker = start_worker(directory)
        try:
            rs = []
            for _ in range(4):
                rs.append(add.delay(1, 1))
                show("add.delay(1, 1)", rs[-1])
            for r in rs:
                r.get(timeout=120)
        finally:
            stop_worker(worker)
        results = Path(task.app.backend.directory)
        print(f"$ ls {results}")
        for path in sorted(results.iterdir(), key=lambda p: p.stat().st_mtime)[-8:]:
            print(f"  {path.stat().st_size:>6}  {path.name}")
        print(f"$ python -m json.tool {results}/celery-task-meta-{rs[-1].id}")
        print(json.dumps(json.loads((results / f"celery-task-meta-{rs[-1].id}").read_bytes()),
                         indent=4))


def main() -> None:
    os.environ.setdefault("EXAMPLE_SLEEP", "3")
    names = sys.argv[1:] or ["states", "custom_states", "file_results"]
    for name in names:
        if name not in ("states", "custom_states", "file_results"):
            raise SystemExit(f"unknown example {name!r}")
        # each program runs in its own process, as its own REPL session would
        code = subprocess.call([sys.executable, __file__, "--session", name])
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--session"]:
        with contextlib.suppress(KeyboardInterrupt):
            session(sys.argv[2])
    else:
        main()
