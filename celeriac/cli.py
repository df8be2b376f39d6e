"""The ``celeriac`` command: ``celeriac -A module worker|result|purge``."""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
from datetime import UTC, datetime
from typing import Any

import click

from . import states
from .app import Celeriac
from .protocol import check_task_id


def find_app(path: str) -> Celeriac:
    """Resolve ``-A``: ``module:attr``, ``module.attr``, or a module holding an app
    (its ``app`` or ``celery`` attribute, a ``celery`` submodule, or any app in it)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if "." not in module_name or exc.name != module_name:
            raise click.UsageError(f"cannot import {module_name!r} for -A: {exc}") from exc
        parent, _, attr = module_name.rpartition(".")
        module = importlib.import_module(parent)
    if attr:
        found = getattr(module, attr, None)
        if isinstance(found, Celeriac):
            return found
        raise click.UsageError(f"{path!r}: {attr!r} is not a celeriac app")
    for name in ("app", "celery"):
        found = getattr(module, name, None)
        if isinstance(found, Celeriac):
            return found
    apps = [v for v in vars(module).values() if isinstance(v, Celeriac)]
    if apps:
        return apps[0]
    try:
        sub = importlib.import_module(f"{module_name}.celery")
    except ImportError:
        sub = None
    if sub is not None:
        for value in vars(sub).values():
            if isinstance(value, Celeriac):
                return value
    raise click.UsageError(f"module {module_name!r} has no celeriac app (celeriac.Celery(...))")


def _load(ctx: click.Context) -> Celeriac:
    opts = ctx.find_root().params
    if not opts.get("app"):
        raise click.UsageError("give the app with -A module (e.g. celeriac -A tasks worker)")
    app = find_app(opts["app"])
    for module in (*app.conf.imports, *app.conf.include):
        importlib.import_module(module)
    return app


def _load_for_worker(ctx: click.Context) -> Celeriac:
    """The app, its modules imported and ``import_modules`` sent, its registry final."""
    from .signals import import_modules

    app = _load(ctx)
    import_modules.send(sender=app)
    app.finalize()
    return app


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", help="The app: module, module:attribute or module.attribute.")
@click.option("-b", "--broker", help="Broker URL (overrides broker_url).")
@click.option("--result-backend", help="Result backend URL (overrides result_backend).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Change to this directory first.")
@click.version_option(package_name="celeriac")
def main(app: str | None, broker: str | None, result_backend: str | None,
         workdir: str | None) -> None:
    """celeriac: a distributed task queue with Celery's API, protocol and result format."""
    if workdir:
        os.chdir(workdir)
    # as Celery does: the command line wins over the configuration and the environment
    if broker:
        os.environ["CELERY_BROKER_URL"] = broker
    if result_backend:
        os.environ["CELERY_RESULT_BACKEND"] = result_backend


@main.command()
@click.option("-c", "--concurrency", type=click.IntRange(min=1),
              help="Number of worker processes (default: worker_concurrency or CPU count).")
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: the "
              "task_queues, else task_default_queue).")
@click.option("-l", "--loglevel", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                                case_sensitive=False),
              help="Logging level; INFO shows each task received and finished.")
@click.option("-n", "--hostname", default="celery@%h", show_default=True,
              help="Node name; %h is replaced by the host name.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.05), default=2.0,
              show_default=True,
              help="Seconds between the worker's heartbeats in the result store.  A worker "
              "silent for 5 intervals is lost: another worker fails the tasks it was "
              "running (WorkerLostError).")
@click.pass_context
def worker(ctx: click.Context, concurrency: int | None, queues: str | None, loglevel: str,
           hostname: str, heartbeat_interval: float) -> None:
    """Start a worker: a supervisor and N processes that each consume and run tasks.

    SIGTERM or Ctrl-C: stop taking messages, finish running tasks, exit (a second
    one kills running tasks).  A process that dies is replaced; the running tasks of
    a worker whose whole host died are failed by another worker (see
    --heartbeat-interval).
    """
    from .worker.supervisor import run_worker, setup_logging

    app = _load_for_worker(ctx)  # first: its logging signal receivers are connected
    setup_logging(loglevel)
    n = concurrency or app.conf.worker_concurrency or os.cpu_count() or 1
    qs = _queues(queues) or app.default_queues()
    node = hostname.replace("%h", socket.gethostname())
    sys.exit(run_worker(app, concurrency=n, queues=qs, hostname=node,
                        heartbeat_interval=heartbeat_interval, options=dict(ctx.params)))


def _queues(option: str | None) -> list[str]:
    return [q.strip() for q in (option or "").split(",") if q.strip()]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.pass_context
def result(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's state, its result or traceback, and its history."""
    app = _load(ctx)
    check_task_id(task_id)
    backend = app.backend
    meta = backend.get_meta(task_id)
    history = backend.history(task_id)
    exists = backend.exists(task_id)
    if as_json:
        out = {
            "id": task_id, "exists": exists, "state": meta["status"], "result": meta["result"],
            "traceback": meta.get("traceback"), "date_done": meta.get("date_done"),
            "history": [dict(e, timestamp=_iso(e["timestamp"])) for e in history],
        }
        click.echo(json.dumps(out, indent=2, default=repr))
        return
    click.echo(f"id:      {task_id}")
    state = meta["status"]
    click.echo(f"state:   {state}" + ("" if exists else "   (unknown id: nothing was sent or "
                                             "stored under it)"))
    if state in states.EXCEPTION_STATES and meta.get("result"):
        exc = meta["result"]
        click.echo(f"error:   {exc.get('exc_type')}: {_args(exc.get('exc_message'))}")
    else:
        click.echo(f"result:  {meta['result']!r}")
    if meta.get("date_done"):
        click.echo(f"done:    {meta['date_done']}")
    if meta.get("traceback"):
        click.echo("traceback:\n" + meta["traceback"].rstrip())
    if history:
        click.echo("history:")
        rows = [(_iso(e["timestamp"]), e["state"], e.get("hostname") or "",
                 str(e.get("pid") or ""), "" if e.get("meta") is None else json.dumps(e["meta"]))
                for e in history]
        header = ("TIME (UTC)", "STATE", "HOSTNAME", "PID", "META")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            cells = [c.ljust(w) for c, w in zip(row[:4], widths, strict=True)]
            click.echo("  " + "  ".join([*cells, row[4]]).rstrip())


def _args(message: Any) -> str:
    if isinstance(message, list):
        return ", ".join(str(m) for m in message)
    return str(message)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option("-Q", "--queues", help="Comma-separated queues (default: the task_queues, "
              "else task_default_queue).")
@click.pass_context
def purge(ctx: click.Context, force: bool, queues: str | None) -> None:
    """Delete every waiting message in the queues (default: task_default_queue).

    Messages parked until their ETA (countdown/eta) are deleted and counted too.
    Messages held by a running worker are not touched; messages whose worker died
    (lapsed lease) are deleted too.
    """
    app = _load(ctx)
    qs = _queues(queues) or app.default_queues()
    if not force:
        click.confirm(f"Delete all waiting messages in {', '.join(qs)}? This cannot be undone.",
                      abort=True)
    count = app.broker.purge(qs)
    click.echo(f"Purged {count} message{'s' if count != 1 else ''} from "
               f"{len(qs)} queue{'s' if len(qs) != 1 else ''}.")
