"""Shared fixtures: real worker processes started with the ``celeriac`` command."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CELERIAC = [sys.executable, "-m", "celeriac"]


class Worker:
    """A ``celeriac -A <module> worker`` process tree, logging to a file."""

    def __init__(self, cwd: Path, app: str, *args: str, env: dict[str, str] | None = None,
                 concurrency: int = 2) -> None:
        self.cwd = cwd
        self.log_path = cwd / f"worker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [*CELERIAC, "-A", app, "worker", "-c", str(concurrency), "-l", "INFO", *args],
            cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for_log("celeriac worker")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen in worker log within {timeout}s:\n{self.log}")

    def child_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                message = f"worker did not stop within {timeout}s:\n{self.log}"
                raise AssertionError(message) from None
        self._log.close()
        return self.proc.returncode

    def kill_all(self) -> None:
        """SIGKILL the whole process tree at once, as a machine crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty project directory, importable and current, with no broker in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_RESULT_BACKEND", raising=False)
    yield tmp_path
    for name in list(sys.modules):
        mod = sys.modules[name]
        if getattr(mod, "__file__", None) and str(tmp_path) in str(mod.__file__):
            del sys.modules[name]


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers started through this list are stopped (or killed) after the test."""
    started: list[Worker] = []
    yield started
    hung = []
    for w in started:
        if w.proc.poll() is None:
            try:
                w.stop(timeout=30)
            except AssertionError as exc:  # killed; the test is failed for it below
                hung.append(str(exc))
    if hung:
        pytest.fail("a worker did not stop on SIGTERM (warm shutdown hung):\n"
                    + "\n".join(hung), pytrace=False)


def wait_until(condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05,
               what: str = "the condition") -> T:
    """Call ``condition`` until it returns something truthy, and return that.  The
    timeout is generous on purpose: it only bounds a test that would otherwise hang,
    it is not a claim about speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(interval)


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


# --------------------------------------------------------------------------- servers

REDIS_HOST = os.environ.get("CELERIAC_TEST_REDIS", "127.0.0.1:6379")
#: Tests use Redis databases 1-12; the benchmarks use 13-15.
_redis_dbs = iter(range(1, 13))


def need_server(name: str, reason: str) -> None:
    """A test that needs a server: fails in CI (CI=true), skips elsewhere."""
    message = f"{name} is not reachable: {reason}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of this test's own (1-12, flushed before and after)."""
    import redis

    global _redis_dbs
    try:
        db = next(_redis_dbs)
    except StopIteration:
        _redis_dbs = iter(range(1, 13))
        db = next(_redis_dbs)
    url = f"redis://{REDIS_HOST}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        need_server("Redis", repr(exc))
    yield url
    client.flushdb()
    client.close()


class CeleryWorker(Worker):
    """A real Celery 5.7 worker (solo pool, or ``prefork -c 1``) on a module in the
    project directory."""

    def __init__(self, cwd: Path, app: str, env: dict[str, str] | None = None,
                 pool: str = "solo") -> None:
        self.cwd = cwd
        self.log_path = cwd / f"celery-worker-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            # a node name of its own: Celery's remote-control queue is exclusive per name,
            # so two Celery workers named alike (another test's, another run's) collide
            [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool, "-c", "1",
             "-l", "INFO", "-n", f"celery-{os.getpid()}-{time.monotonic_ns()}@%h",
             "--without-heartbeat", "--without-mingle", "--without-gossip"],
            cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for_log(" ready.", timeout=60)


AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def amqp_connection() -> Any:
    """A connected py-amqp connection to the RabbitMQ of AMQP_URL (the test's own)."""
    from urllib.parse import unquote, urlsplit

    import amqp

    url = urlsplit(AMQP_URL)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    conn = amqp.Connection(f"{url.hostname}:{url.port or 5672}",
                           userid=unquote(url.username or "guest"),
                           password=unquote(url.password or "guest"), virtual_host=vhost)
    conn.connect()
    return conn


@pytest.fixture
def amqp_queue() -> Iterator[str]:
    """A RabbitMQ queue name of this test's own (deleted afterwards, with its exchange)."""
    import uuid

    import amqp

    name = f"test-{uuid.uuid4().hex[:12]}"

    def connect() -> amqp.Connection:
        return amqp_connection()

    try:
        connect().close()
    except Exception as exc:
        need_server("RabbitMQ", repr(exc))
    yield name
    conn = connect()  # a test may have closed every connection
    channel = conn.channel()
    for q in (name, "celeriac.dead_letters"):
        try:
            channel.queue_delete(q)
        except Exception:
            channel = conn.channel()
    with contextlib.suppress(Exception):
        channel.exchange_delete(name)
    conn.close()


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def broker_env(request, project, monkeypatch) -> dict[str, str]:
    """TEST_BROKER / TEST_BACKEND / TEST_QUEUE for each broker (set in this process's
    environment too): the embedded SQLite file, Redis for both, and RabbitMQ with Redis
    results.  Every value is this test's own."""
    kind = request.param
    if kind == "sqlite":
        values = {"TEST_BROKER": f"sqlite:///{project}/tasks.db", "TEST_QUEUE": "celery"}
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        values = {"TEST_BROKER": url, "TEST_BACKEND": url, "TEST_QUEUE": "celery"}
    else:
        values = {"TEST_BROKER": AMQP_URL, "TEST_BACKEND": request.getfixturevalue("redis_url"),
                  "TEST_QUEUE": request.getfixturevalue("amqp_queue")}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


@pytest.fixture
def private_rabbit() -> Iterator[Any]:
    """A RabbitMQ node of this test's own, to stop and start (tests/servers.py)."""
    from .servers import PrivateRabbit

    yield from _private(PrivateRabbit, PrivateRabbit.launch)


@pytest.fixture
def private_redis() -> Iterator[Any]:
    """A Redis server of this test's own with an append-only file (tests/servers.py)."""
    from .servers import PrivateRedis

    yield from _private(PrivateRedis, PrivateRedis.start)


def _private(kind: Any, start: Any) -> Iterator[Any]:
    why = kind.available()
    if why:
        need_server(f"a private {kind.__name__[7:]}", why)
    server = kind()
    try:
        start(server)
        yield server
    finally:
        server.close()
