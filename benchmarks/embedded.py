"""End-to-end throughput and round trip on a one-machine store with no server.

celeriac: its embedded SQLite broker, results in the same SQLite file (the default when
no result backend is set).  Celery 5.7: its nearest no-server equivalent, kombu's
SQLAlchemy transport on SQLite (``sqla+sqlite:///``) with the SQLAlchemy result backend
on SQLite (``db+sqlite:///``), prefork pool.  Both workers run ``-c 2``, both with their
default settings, on the same no-op task.

For each side the script makes a temporary directory, writes the task module there,
starts the worker, and runs one producer process that (after the worker has answered a
warm-up task) measures:

(a) enqueue rate: N ``delay()`` calls in a row (the worker is consuming meanwhile);
(b) end-to-end: from the first ``delay()`` to the last of the N results being ready
    ((a) and (b) are one run, done ``--repeat`` times: the median is reported);
(c) round trip: ``delay().get()`` one after the other, p50 / p90 after warm-up calls;
(d) worker memory: summed RSS of the worker's processes (from /proc) after the run.

Usage::

    .venv/bin/python benchmarks/embedded.py [--n 5000] [--celery-n 1000] [--repeat 3]
        [--only celeriac|celery] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common as common

SIDES = ("celeriac", "celery")
MODULE = "benchtasks"
#: Longest wait for the worker to answer the first task (start-up, imports, tables).
WARMUP_TIMEOUT = 90.0
#: Longest one producer run may take before the side is declared failed.
CLIENT_TIMEOUT = 420.0

CELERIAC_MODULE = '''\
from celeriac import Celery

app = Celery("benchtasks", broker="sqlite:///{dir}/bench.db")


@app.task
def noop():
    return None
'''

CELERY_MODULE = '''\
from celery import Celery

app = Celery(
    "benchtasks",
    broker="sqla+sqlite:///{dir}/broker.db",
    backend="db+sqlite:///{dir}/results.db",
)
app.conf.broker_connection_retry_on_startup = True
{extra}

@app.task
def noop():
    return None
'''


# ---------------------------------------------------------------------- producer side


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_client(side: str, n: int, repeat: int, samples: int, warmup: int,
               get_interval: float | None) -> None:
    """The producer process (cwd = the side's temp directory); prints one JSON line."""
    sys.path.insert(0, os.getcwd())
    import benchtasks  # type: ignore[import-not-found]

    noop = benchtasks.noop
    get_kw: dict[str, Any] = {} if get_interval is None else {"interval": get_interval}
    out: dict[str, Any] = {"side": side, "n": n}

    # The worker is ready when it has answered; then once more with both processes busy.
    t = time.perf_counter()
    noop.delay().get(timeout=WARMUP_TIMEOUT, **get_kw)
    out["first_answer_s"] = time.perf_counter() - t
    for r in [noop.delay() for _ in range(8)]:
        r.get(timeout=WARMUP_TIMEOUT, **get_kw)

    # (a) + (b): N delay() calls, then wait for every result, in order; `repeat` times
    enqueue, e2e = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        results = [noop.delay() for _ in range(n)]
        t1 = time.perf_counter()
        for r in results:
            r.get(timeout=CLIENT_TIMEOUT, **get_kw)
        t2 = time.perf_counter()
        enqueue.append(t1 - t0)
        e2e.append(t2 - t0)
    out["enqueue_runs_s"] = enqueue
    out["e2e_runs_s"] = e2e
    out["enqueue_s"] = statistics.median(enqueue)
    out["e2e_s"] = statistics.median(e2e)

    # (c): sequential round trips
    lat = []
    for i in range(warmup + samples):
        t = time.perf_counter()
        noop.delay().get(timeout=60, **get_kw)
        if i >= warmup:
            lat.append(time.perf_counter() - t)
    out["rt_samples"] = len(lat)
    out["rt_p50_ms"] = percentile(lat, 0.5) * 1000
    out["rt_p90_ms"] = percentile(lat, 0.9) * 1000
    out["rt_mean_ms"] = statistics.fmean(lat) * 1000
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------- orchestration


def worker_argv(side: str) -> list[str]:
    if side == "celeriac":
        return [common.tool("celeriac"), "-A", MODULE, "worker", "-c", "2"]
    return [common.tool("celery"), "-A", MODULE, "worker", "-c", "2", "--pool", "prefork",
            "-l", "WARNING"]


def module_source(side: str, directory: str, celery_poll: float | None) -> str:
    if side == "celeriac":
        return CELERIAC_MODULE.format(dir=directory)
    extra = ""
    if celery_poll is not None:
        # kombu's SQLAlchemy transport hands every transport option to create_engine(),
        # which refuses polling_interval: set it on the transport class instead
        extra = ("from kombu.transport import sqlalchemy as _sqla\n\n"
                 f"_sqla.Transport.polling_interval = {celery_poll}\n")
    return CELERY_MODULE.format(dir=directory, extra=extra)


def worker_problems(log_path: str) -> list[str]:
    """Error lines the worker logged (tracebacks, ERROR records)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [line for line in lines if "ERROR" in line or "Traceback" in line
            or "Error:" in line]


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    n = args.n if side == "celeriac" else args.celery_n
    samples = args.samples if side == "celeriac" else args.celery_samples
    warmup = args.warmup if side == "celeriac" else args.celery_warmup
    directory = tempfile.mkdtemp(prefix=f"bench-{side}-")
    env = dict(os.environ)
    # celeriac's wake-up sockets go under $TMPDIR: keep them in this run's directory too
    env["TMPDIR"] = directory
    env.pop("CELERY_BROKER_URL", None)
    env.pop("CELERY_RESULT_BACKEND", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    with open(os.path.join(directory, f"{MODULE}.py"), "w") as f:
        f.write(module_source(side, directory, args.celery_poll))
    worker = None
    result: dict[str, Any] = {"side": side, "n": n, "dir": directory}
    try:
        print(f"[{side}] starting worker in {directory}", flush=True)
        worker = common.Started(worker_argv(side), cwd=directory, env=env,
                                log_path=os.path.join(directory, "worker.log"))
        client = [sys.executable, os.path.abspath(__file__), "--client", side, "--n", str(n),
                  "--repeat", str(args.repeat), "--samples", str(samples),
                  "--warmup", str(warmup)]
        if side == "celery" and args.celery_poll is not None:
            client += ["--get-interval", str(args.celery_poll)]
        print(f"[{side}] producer: {args.repeat} x {n} tasks, then {warmup}+{samples} "
              "round trips", flush=True)
        try:
            proc = subprocess.run(client, cwd=directory, env=env, capture_output=True,
                                  text=True, timeout=CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"producer did not finish within {CLIENT_TIMEOUT:.0f} s") from None
        if proc.returncode != 0 or not proc.stdout.strip():
            err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"producer failed: {err}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        result["rss_mb"], result["processes"] = common.rss_mb(worker.pid)
        result["worker_problems"] = worker_problems(worker.log_path)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        if worker is not None:
            result["worker_log"] = worker.log_tail(15)
            result["worker_problems"] = worker_problems(worker.log_path)
        print(f"[{side}] FAILED: {result['error']}", flush=True)
    finally:
        if worker is not None:
            worker.stop()
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return result


def fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:,.1f}×" if r >= 10 else f"{r:,.2f}×"


def rows_for(results: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The table: one column per side run, and a ratio column when both ran."""
    sides = [s for s in SIDES if s in results]
    both = len(sides) == 2

    def value(side: str, key: str, per_second: bool) -> float | None:
        r = results[side]
        if "error" in r or key not in r:
            return None
        return float(r["n"]) / r[key] if per_second else float(r[key])

    def row(label: str, key: str, digits: int, better: str | None,
            per_second: bool = False) -> list[str]:
        v = {s: value(s, key, per_second) for s in sides}
        cells = [label, *(fmt(v[s], digits) for s in sides)]
        if both:
            if better == "higher":
                cells.append(ratio(v["celeriac"], v["celery"]))
            elif better == "lower":
                cells.append(ratio(v["celery"], v["celeriac"]))
            else:
                cells.append("")
        return cells

    def spread(label: str, key: str) -> list[str]:
        cells = [label]
        for s in sides:
            runs = results[s].get(key)
            rates = sorted(results[s]["n"] / t for t in runs) if runs else None
            cells.append(f"{rates[0]:,.0f}–{rates[-1]:,.0f}" if rates else "—")
        return cells + ([""] if both else [])

    def plain(label: str, key: str) -> list[str]:
        return [label, *(str(results[s].get(key, "—")) for s in sides), *([""] if both else [])]

    rows = [
        plain("tasks (N)", "n"),
        row("(a) enqueue rate, tasks/s", "enqueue_s", 0, "higher", per_second=True),
        spread("(a) lowest–highest run", "enqueue_runs_s"),
        row("(b) end-to-end throughput, tasks/s", "e2e_s", 0, "higher", per_second=True),
        spread("(b) lowest–highest run", "e2e_runs_s"),
        row("(b) first delay() to last result ready (median), s", "e2e_s", 2, None),
        row("(c) round trip p50, ms", "rt_p50_ms", 1, "lower"),
        row("(c) round trip p90, ms", "rt_p90_ms", 1, "lower"),
        plain("(c) round-trip samples (after warm-up)", "rt_samples"),
        row("(d) worker RSS, MB", "rss_mb", 0, "lower"),
        plain("(d) worker processes counted", "processes"),
    ]
    return ["", *sides, *(["ratio"] if both else [])], rows


def section(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    header, rows = rows_for(results)
    lines = [
        "## Embedded store, no server: throughput and round trip",
        "",
        "- celeriac: embedded SQLite broker, results in the same SQLite file (the default: "
        "`broker='sqlite:////<tmp>/bench.db'`, no `result_backend`), "
        "`celeriac -A benchtasks worker -c 2`.",
        "- Celery 5.7: kombu's SQLAlchemy transport `sqla+sqlite:///<tmp>/broker.db` and the "
        "SQLAlchemy result backend `db+sqlite:///<tmp>/results.db`, "
        "`celery -A benchtasks worker -c 2 --pool prefork -l WARNING`"
        + ("" if args.celery_poll is None else
           f", with `polling_interval` and `get(interval=)` set to {args.celery_poll} s")
        + ".",
        "- Task: `@app.task def noop(): return None`; one producer process; "
        "default settings on both sides.",
        "",
        f"Command: `{common.command_line()}`  ",
        f"Date: {common.today()}  ",
        "Machine: " + common.machine_line(("celeriac", "celery", "kombu", "sqlalchemy",
                                           "sqlite")),
        "",
        common.markdown_table(header, rows),
        "",
        "Ratio: how many times better celeriac is: celeriac / Celery for rates, "
        "Celery / celeriac for latencies and memory.  Rates are per task, so the two "
        "sides' different N compare directly.  (a) and (b) ran "
        f"{args.repeat} time(s) per side with the same worker; the table shows the median "
        "run and the lowest and highest.",
        "",
    ]
    notes = []
    if "celery" in results and results["celery"]["n"] != results.get("celeriac", {}).get("n"):
        notes.append(
            f"Celery ran N={results['celery']['n']} tasks (celeriac "
            f"{results.get('celeriac', {}).get('n', '—')}) and "
            f"{results['celery'].get('rt_samples', args.celery_samples)} round-trip samples "
            f"after {args.celery_warmup} warm-up calls (celeriac {args.samples} after "
            f"{args.warmup}), to keep the run within a few minutes: its round trip is about "
            "a second."
        )
    if "celery" in results and args.celery_poll is None:
        notes.append(
            "Celery's round trip is dominated by two default polling intervals: an idle "
            "worker polls kombu's SQLAlchemy transport every second (`polling_interval`, "
            "default 1 s) and `AsyncResult.get()` polls the database backend every 0.5 s "
            "(`interval`). celeriac's worker and `get()` are woken through Unix datagram "
            "sockets when a message or a result is written, so they do not poll."
        )
    notes.append(
        "Enqueue rate (a) is measured with the worker running, so the producer competes with "
        "it for the two cores and for the store's write lock, as in real use.  Worker RSS sums "
        "the main process and its children, so pages shared after fork count more than once "
        "(on both sides)."
    )
    for side in SIDES:
        r = results.get(side)
        if r is None:
            continue
        if note := common.failure_note(side, r) or common.problems_note(side, r):
            notes.append(note)
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="tasks for (a)/(b), celeriac")
    parser.add_argument("--celery-n", type=int, default=1000, help="tasks for (a)/(b), Celery")
    parser.add_argument("--samples", type=int, default=300, help="round trips, celeriac")
    common.add_sampling_args(parser)
    parser.add_argument("--celery-samples", type=int, default=100,
                        help="round trips, Celery (each takes about 1 s with its defaults)")
    parser.add_argument("--celery-warmup", type=int, default=10)
    parser.add_argument("--celery-poll", type=float, default=None,
                        help="set Celery's polling_interval and get(interval=) (default: "
                             "Celery's own defaults, 1 s and 0.5 s)")
    common.add_output_args(parser, SIDES)
    parser.add_argument("--client", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--get-interval", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        run_client(args.client, args.n, args.repeat, args.samples, args.warmup,
                   args.get_interval)
        return 0

    # a SIGTERM ends the run like Ctrl-C does: through the finally blocks that stop workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        if args.only and side != args.only:
            continue
        started = time.monotonic()
        results[side] = run_side(side, args)
        print(f"[{side}] done in {time.monotonic() - started:.0f} s", flush=True)

    header, rows = rows_for(results)
    print()
    print(common.plain_table(header, rows))
    for side, r in results.items():
        if "error" in r:
            print(f"\n{side} failed: {r['error']}\n{r.get('worker_log', '')}")
        elif r.get("worker_problems"):
            print(f"\n{side}'s worker logged errors:\n" + "\n".join(r["worker_problems"][:10]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": "embedded", "results": results}, f)
    if args.write:
        common.write_section("embedded", section(args, results))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
