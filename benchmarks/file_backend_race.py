"""Torn reads of the file result backend: celeriac's vs Celery 5.7's ``FilesystemBackend``.

For each project, in a temporary directory of its own:

* a writer process stores state PROGRESS ``--steps`` times for one task id, each time
  with a meta of about ``--size`` bytes (``{"step": i, "blob": "x" * size}``), then
  stores SUCCESS;
* ``--readers`` reader processes (started with it) read the task's state with the
  project's own ``AsyncResult(task_id, app=app).state`` in a tight loop until they see
  SUCCESS.

Each read is one ``.state`` access on a fresh ``AsyncResult`` (one read of the file).
Counted: reads; reads that returned PENDING after a PROGRESS had been seen ("went back
to PENDING": the file was caught empty, mid-rewrite); reads that raised (a torn file
that does not decode).  celeriac's backend writes a temporary file and renames it
over the old one, so both counts should be 0.

Usage::

    .venv/bin/python benchmarks/file_backend_race.py [--steps 300] [--size 200000]
        [--readers 1] [--only celeriac|celery] [--write]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

import _common as common

SIDES = ("celeriac", "celery")
#: Longest a writer or reader may run before the side is declared failed.
RUN_TIMEOUT = 180.0
REFERENCE = ("Celery 5.7 was measured before this script existed at 846 reads back to "
             "PENDING and 38 decode failures out of 131,201 reads")


def make_app(side: str, directory: str) -> Any:
    url = "file://" + directory  # directory is absolute: file:///tmp/...
    if side == "celery":
        import celery

        return celery.Celery("race", result_backend=url)
    import celeriac

    return celeriac.Celery("race", result_backend=url)


def writer(side: str, directory: str, task_id: str, steps: int, size: int,
           ready: Any, go: Any, out: Any) -> None:
    app = make_app(side, directory)
    backend = app.backend
    ready.set()
    go.wait()
    started = time.perf_counter()
    for i in range(steps):
        meta = {"step": i, "blob": "x" * size}
        if side == "celery":
            backend.store_result(task_id, meta, "PROGRESS")
        else:
            backend.store(task_id, "PROGRESS", meta)
    if side == "celery":
        backend.store_result(task_id, 42, "SUCCESS")
    else:
        backend.store(task_id, "SUCCESS", 42)
    out.put(("writer", {"seconds": time.perf_counter() - started}))


def reader(side: str, directory: str, task_id: str, ready: Any, go: Any, out: Any) -> None:
    app = make_app(side, directory)
    if side == "celery":
        from celery.result import AsyncResult
    else:
        from celeriac.result import AsyncResult
    reads = back_to_pending = failures = reads_in_window = 0
    seen_progress = timed_out = False
    states: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    example: str | None = None
    AsyncResult(task_id, app=app).state  # noqa: B018 - load everything once before timing
    ready.set()
    go.wait()
    started = time.perf_counter()
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        if reads % 1024 == 0 and time.monotonic() > deadline:
            timed_out = True
            break
        reads += 1
        try:
            state = AsyncResult(task_id, app=app).state
        except Exception as exc:
            failures += 1
            errors[type(exc).__name__] += 1
            if example is None:
                example = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:300]
            continue
        states[state] += 1
        if seen_progress:
            reads_in_window += 1
        if state == "PROGRESS":
            seen_progress = True
        elif state == "PENDING" and seen_progress:
            back_to_pending += 1
        elif state == "SUCCESS":
            break
    out.put(("reader", {
        "reads": reads, "back_to_pending": back_to_pending, "failures": failures,
        "reads_in_window": reads_in_window,
        "seconds": time.perf_counter() - started, "states": dict(states),
        "errors": dict(errors), "example": example, "timed_out": timed_out,
    }))


def run_round(side: str, directory: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One task id: the readers and the writer, released together; their reports."""
    ctx = mp.get_context("spawn")
    task_id = str(uuid.uuid4())
    out = ctx.Queue()
    go = ctx.Event()
    procs: list[Any] = []
    try:
        readies = []
        for _ in range(args.readers):
            ready = ctx.Event()
            p = ctx.Process(target=reader, args=(side, directory, task_id, ready, go, out))
            p.start()
            procs.append(p)
            readies.append(ready)
        ready = ctx.Event()
        w = ctx.Process(target=writer, args=(side, directory, task_id, args.steps, args.size,
                                             ready, go, out))
        w.start()
        procs.append(w)
        readies.append(ready)
        for ready in readies:
            if not ready.wait(60):
                raise RuntimeError("a process did not start within 60 s")
        go.set()  # readers and the writer start together
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + RUN_TIMEOUT + 30
        while len(got) < args.readers + 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"no outcome within {RUN_TIMEOUT + 30:.0f} s")
            try:
                kind, report = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:  # check that nobody died without reporting
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a {side} process exited with {dead[0].exitcode}"
                                       ) from None
                continue
            got.append(dict(report, kind=kind))
        return got
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        out.close()


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"race-{side}-")
    directory = os.path.join(root, side)
    os.makedirs(directory)  # Celery's backend wants it to exist
    result: dict[str, Any] = {"side": side}
    try:
        got: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            got += run_round(side, directory, args)
        readers = [r for r in got if r["kind"] == "reader"]
        writers = [r for r in got if r["kind"] == "writer"]
        result["writer_s"] = statistics.fmean(r["seconds"] for r in writers)
        result["reads"] = sum(r["reads"] for r in readers)
        result["reads_in_window"] = sum(r["reads_in_window"] for r in readers)
        result["back_to_pending"] = sum(r["back_to_pending"] for r in readers)
        result["failures"] = sum(r["failures"] for r in readers)
        result["timed_out"] = any(r["timed_out"] for r in readers)
        errors: Counter[str] = Counter()
        states: Counter[str] = Counter()
        for r in readers:
            errors.update(r["errors"])
            states.update(r["states"])
        result["errors"] = dict(errors)
        result["states"] = dict(states)
        result["example"] = next((r["example"] for r in readers if r["example"]), None)
        result["rounds_hit"] = sum(1 for r in readers if r["back_to_pending"] or r["failures"])
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{side}] FAILED: {result['error']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace,
          ) -> tuple[list[str], list[list[str]]]:
    sides = [s for s in SIDES if s in results]

    def cell(side: str, key: str, spec: str = ",") -> str:
        r = results[side]
        return "—" if "error" in r or key not in r else format(r[key], spec)

    rows = [
        ["reads", *(cell(s, "reads") for s in sides)],
        ["reads that decoded, after the first PROGRESS was seen",
         *(cell(s, "reads_in_window") for s in sides)],
        ["went back to PENDING after a PROGRESS", *(cell(s, "back_to_pending") for s in sides)],
        ["reads that raised (decode errors)", *(cell(s, "failures") for s in sides)],
        [f"rounds (of {args.rounds}) with at least one bad read",
         *(cell(s, "rounds_hit") for s in sides)],
        [f"writer time per round ({args.steps} PROGRESS of ~{args.size // 1000} KB + "
         "SUCCESS), s", *(cell(s, "writer_s", ",.2f") for s in sides)],
    ]
    return ["", *sides], rows


def section(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    header, rows = table(results, args)
    lines = [
        "## File result backend: torn reads under a concurrent writer",
        "",
        f"One writer process stores PROGRESS {args.steps} times for one task, each with a "
        f"meta of about {args.size // 1000} KB (`{{'step': i, 'blob': 'x' * {args.size}}}`), "
        f"then SUCCESS; {args.readers} reader process(es), released together with the writer, read "
        "`AsyncResult(task_id, app=app).state` in a tight loop until SUCCESS.  Celery: "
        "`celery.Celery(result_backend='file:///<tmp>/celery')`, "
        "`app.backend.store_result(task_id, meta, 'PROGRESS')`.  celeriac: "
        "`celeriac.Celery(result_backend='file:///<tmp>/celeriac')`, "
        "`app.backend.store(task_id, 'PROGRESS', meta)`.",
        "",
        f"Command: `{common.command_line()}`  ",
        f"Date: {common.today()}  ",
        "Machine: " + common.machine_line(("celeriac", "celery")),
        "",
        common.markdown_table(header, rows),
        "",
        "Target for celeriac: 0 reads back to PENDING and 0 decode errors.  Celery's backend "
        "rewrites the meta file in place (`open(path, 'wb')` then `write`), so a reader can "
        "find it empty (PENDING: the task looks as if it never ran) or half written (a "
        "decode error).  celeriac writes a temporary file, fsyncs it and renames it over "
        "the old one, so a reader sees the old meta or the new one.  The fsync is also why "
        "celeriac's writer is slower.  Reference: " + REFERENCE + ".",
        "",
    ]
    for side in SIDES:
        r = results.get(side)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"- **{side} failed**: `{r['error']}`")
            continue
        states = ", ".join(f"{k} {v:,}" for k, v in sorted(r["states"].items()))
        lines.append(f"- {side}: states read: {states}.")
        if r["errors"]:
            kinds = ", ".join(f"{k} ×{v:,}" for k, v in r["errors"].items())
            lines.append(f"  Exceptions: {kinds}; e.g. `{r['example']}`.")
        if r.get("timed_out"):
            lines.append(f"  The reader gave up after {RUN_TIMEOUT:.0f} s without SUCCESS.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="PROGRESS writes")
    parser.add_argument("--size", type=int, default=200_000, help="bytes of blob per write")
    parser.add_argument("--readers", type=int, default=1, help="reader processes")
    parser.add_argument("--rounds", type=int, default=10,
                        help="repeat with a new task id (and new processes) this many times")
    parser.add_argument("--only", choices=SIDES, help="run one side only")
    parser.add_argument("--write", action="store_true",
                        help="write the section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        if args.only and side != args.only:
            continue
        print(f"[{side}] {args.steps} writes of ~{args.size // 1000} KB, "
              f"{args.readers} reader(s)", flush=True)
        results[side] = run_side(side, args)
    header, rows = table(results, args)
    print()
    print(common.plain_table(header, rows))
    for side, r in results.items():
        if "error" in r:
            print(f"{side} failed: {r['error']}")
        elif r.get("example"):
            print(f"{side}: first exception: {r['example']}")
    if args.write:
        common.write_section("file-race", section(args, results))
    bad = results.get("celeriac", {})
    return 1 if any("error" in r for r in results.values()) or bad.get("back_to_pending") \
        or bad.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
