"""Helpers shared by the benchmark scripts: processes, /proc, machine facts, the doc."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "BENCHMARKS.md")
VENV_BIN = os.path.dirname(sys.executable)


def add_output_args(parser: argparse.ArgumentParser, sides: tuple[str, ...]) -> None:
    """The options every side-by-side script has: --only, --write, --json, --keep."""
    parser.add_argument("--only", choices=sides, help="run one side only")
    parser.add_argument("--write", action="store_true",
                        help="write the section of docs/BENCHMARKS.md")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp directories")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """Where the server benchmarks run: a Redis database and a RabbitMQ virtual host."""
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="the Redis server (no database number)")
    parser.add_argument("--db", type=int, default=13,
                        help="the Redis database to use (flushed before and after)")
    parser.add_argument("--amqp", default="127.0.0.1:5672", help="the RabbitMQ server")
    parser.add_argument("--vhost", default="celeriac-bench",
                        help="RabbitMQ virtual host made for the run and deleted after it")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """How often the throughput runs repeat, and the untimed round trips first."""
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of (a)/(b) per side; the table shows the median")
    parser.add_argument("--warmup", type=int, default=20, help="untimed round trips first")


def tool(name: str) -> str:
    """A console script of the running interpreter's environment (celery, celeriac)."""
    path = os.path.join(VENV_BIN, name)
    return path if os.path.exists(path) else name


# ---------------------------------------------------------------------- processes


class Started:
    """A process started in a session of its own, so it and its children stop together."""

    def __init__(self, argv: list[str], *, cwd: str, env: dict[str, str], log_path: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL the whole process group after ``grace`` s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        # children left behind (or a main process that did not exit) share its group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: split after it
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def rss_mb(pid: int) -> tuple[float, int]:
    """Summed VmRSS (MB) of ``pid`` and its descendants, and how many processes that is."""
    total_kb, count = 0, 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
                        count += 1
                        break
        except OSError:
            continue
    return total_kb / 1024, count


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


# ---------------------------------------------------------------------- machine


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def celeriac_revision() -> str:
    """The commit the measured celeriac code comes from, marked when celeriac/ differs."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "celeriac"], cwd=REPO,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not rev:
        return "unknown"
    return f"{rev} with uncommitted changes to celeriac/" if dirty else rev


def machine() -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GB"
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "sqlite": sqlite3.sqlite_version,
        "celeriac": f"{_version('celeriac')} (commit {celeriac_revision()})",
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "sqlalchemy": _version("sqlalchemy"),
    }


def machine_line(keys: tuple[str, ...]) -> str:
    m = machine()
    return (f"{m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Linux {m['kernel']}, "
            f"Python {m['python']}; " + ", ".join(f"{k} {m[k]}" for k in keys))


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join([".venv/bin/python", script, *sys.argv[1:]])


# ---------------------------------------------------------------------- the doc


DOC_HEADER = """# Benchmarks

The scripts in `benchmarks/` run celeriac and Celery 5.7 side by side, in the same run and
on the same kind of store, and report ratios:

- `benchmarks/embedded.py`: throughput and round trip of a no-op task through a
  one-machine store that needs no server (celeriac's embedded SQLite broker and results;
  Celery's SQLAlchemy transport and result backend on SQLite), both workers `-c 2`, and
  the workers' memory.
- `benchmarks/servers.py --setup redis|amqp-redis|amqp-file`: the same measures on
  servers, both sides with the same URLs: Redis as broker and result store; RabbitMQ as
  broker with Redis results; RabbitMQ as broker with file results.  It also times how
  fast a worker drains a queue filled beforehand.  Redis setups use one database
  (`--db`, default 13), which the script flushes; RabbitMQ setups use a virtual host of
  their own (`--vhost`, default `celeriac-bench`, made with `rabbitmqctl` and deleted
  after).  Do not run it while the test suite runs: the suite's Redis tests use
  databases 1-12 and one of its RabbitMQ tests closes every connection of the server.
- `benchmarks/all.py`: the two above for every setup, one after the other, then a
  summary table of all of them.
- `benchmarks/file_backend_race.py`: whether a reader of the file result backend
  (`file:///dir`) ever sees a task go back to PENDING or fails to decode its result while
  a writer keeps updating the task's state.

Worker start-up is never timed: the scripts start the workers, wait until they answer a
warm-up task, then measure.  Every store file (and celeriac's wake-up sockets) lives in
a temporary directory of its own, removed at the end, and every process a script starts
is stopped before it exits, also on error.

Run them from the repository root; the `bench` extra installs Celery and SQLAlchemy
(which Celery's SQLite broker and result backend need).  One command runs every
side-by-side benchmark and rewrites this file's sections (about 25 minutes):

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/all.py --write
    .venv/bin/python benchmarks/file_backend_race.py --write

Without `--write` a script only prints its table; with it, it replaces its own section
below (between its `<!-- name:start -->` / `<!-- name:end -->` markers).  `--help` lists
the other options (`--only celeriac|celery`, sizes, sample counts).

The figures below come from one 2-core development machine, whose details each section
records.  Absolute numbers move with the machine; compare the ratios.

"""


def write_section(name: str, body: str) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the doc."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    try:
        with open(DOC, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        text = DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote section {name!r} of {os.path.relpath(DOC, REPO)}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for j, r in enumerate([header, *rows]):
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def failure_note(side: str, r: dict[str, Any]) -> str | None:
    """The note for a side whose run failed: its error and the worker log's tail."""
    if "error" not in r:
        return None
    tail = r.get("worker_log", "").strip()
    return f"**{side} failed**: `{r['error']}`" + (
        f"; worker log tail:\n\n```\n{tail}\n```" if tail else "")


def problems_note(side: str, r: dict[str, Any]) -> str | None:
    """The note for a side whose worker logged errors or tracebacks (the first five)."""
    problems = r.get("worker_problems")
    if not problems:
        return None
    shown = "\n".join(problems[:5])
    return (f"{side}'s worker logged {len(problems)} problem line(s), first ones:"
            f"\n\n```\n{shown}\n```")
