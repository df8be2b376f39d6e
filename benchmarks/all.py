"""Every side-by-side benchmark in one go, then a summary table of them.

Runs, one after the other (never at the same time: they share two cores):

    embedded.py                 celeriac's embedded SQLite vs Celery on SQLAlchemy/SQLite
    servers.py --setup redis    Redis broker and results
    servers.py --setup amqp-redis   RabbitMQ broker, Redis results
    servers.py --setup amqp-file    RabbitMQ broker, file results
    servers.py --setup amqp-redis --no-confirm   the same, celeriac without publisher
                                confirms (as Celery publishes by default); no drain

each with ``--write`` when this script has it, so every section of docs/BENCHMARKS.md is
rewritten from the same run, and then the ``summary`` section from their results.
Options after ``--`` go to every script (``-- --n 2000 --repeat 1`` for a quick look).

Usage::

    .venv/bin/python benchmarks/all.py [--write] [--skip embedded,amqp-file] [-- ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common as common

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [
    ("embedded", ["embedded.py"]),
    ("redis", ["servers.py", "--setup", "redis"]),
    ("amqp-redis", ["servers.py", "--setup", "amqp-redis"]),
    ("amqp-file", ["servers.py", "--setup", "amqp-file"]),
    ("amqp-redis-noconfirm", ["servers.py", "--setup", "amqp-redis", "--no-confirm",
                              "--drain-small", "0"]),
]
TITLES = {
    "embedded": "embedded (celeriac SQLite; Celery sqla+sqlite / db+sqlite)",
    "redis": "Redis broker + Redis results",
    "amqp-redis": "RabbitMQ broker + Redis results",
    "amqp-file": "RabbitMQ broker + file results",
    "amqp-redis-noconfirm": "RabbitMQ broker + Redis results, celeriac without publisher "
                            "confirms (Celery's default)",
}


def rate(r: dict[str, Any], key: str) -> float | None:
    return r["n"] / r[key] if key in r and r.get("n") else None


def summary(done: dict[str, dict[str, Any]], command: str) -> str:
    header = ["setup", "end-to-end tasks/s, celeriac", "Celery", "ratio",
              "round trip p50 ms, celeriac", "Celery", "ratio", "worker RSS MB, celeriac",
              "Celery"]
    rows = []
    for name, _ in RUNS:
        if name not in done:
            continue
        c = done[name].get("celeriac", {})
        y = done[name].get("celery", {})
        ce, ye = rate(c, "e2e_s"), rate(y, "e2e_s")
        cp, yp = c.get("rt_p50_ms"), y.get("rt_p50_ms")
        rows.append([
            TITLES[name], _fmt(ce), _fmt(ye), _ratio(ce, ye),
            _fmt(cp, 1), _fmt(yp, 1), _ratio(yp, cp),
            _fmt(c.get("rss_mb")), _fmt(y.get("rss_mb")),
        ])
    return "\n".join([
        "## Summary: every setup, same machine, one run",
        "",
        f"Command: `{command}`  ",
        f"Date: {common.today()}  ",
        "Machine: " + common.machine_line(("celeriac", "celery", "kombu")),
        "",
        common.markdown_table(header, rows),
        "",
        "Both sides run `-c 2` with default settings, the same no-op task and the same "
        "producer; each setup's own section below has the details, the spread over runs, "
        "enqueue rates, p90 and drain figures.  Ratio: how many times better celeriac is.",
    ])


def _fmt(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true",
                        help="rewrite every section of docs/BENCHMARKS.md and the summary")
    parser.add_argument("--skip", default="", help="comma-separated runs to leave out: "
                        + ", ".join(name for name, _ in RUNS))
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="after --: options passed to every script")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    rest = [a for a in args.rest if a != "--"]
    done: dict[str, dict[str, Any]] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name, script in RUNS:
            if name in skip:
                continue
            out = os.path.join(tmp, f"{name}.json")
            argv = [sys.executable, os.path.join(HERE, script[0]), *script[1:], "--json", out,
                    *(["--write"] if args.write else []), *rest]
            print(f"=== {name}: {' '.join(argv[1:])}", flush=True)
            started = time.monotonic()
            code = subprocess.call(argv, cwd=common.REPO)
            print(f"=== {name}: exit {code} after {time.monotonic() - started:.0f} s",
                  flush=True)
            if code != 0:
                failed.append(name)
            if os.path.exists(out):
                with open(out) as f:
                    done[name] = json.load(f)["results"]
    body = summary(done, common.command_line())
    print()
    print(body)
    if args.write and done:
        common.write_section("summary", body)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
