"""Private servers for tests that stop and start them: a Redis with an append-only file
and a RabbitMQ node, each on a spare port of its own (never the shared servers).

Ports: the first free one of ``CELERIAC_TEST_PRIVATE_REDIS_PORTS`` (default 6691-6699) /
``CELERIAC_TEST_PRIVATE_AMQP_PORTS`` (default 5681-5689); the RabbitMQ node's
distribution port is its AMQP port + 20000."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port(variable: str, default: str) -> int:
    first, _, last = os.environ.get(variable, default).partition("-")
    for port in range(int(first), int(last or first) + 1):
        if not _port_open(port) and not _port_open(port + 20000):
            return port
    raise RuntimeError(f"no free port in {variable}={os.environ.get(variable, default)}")


def _wait(condition: object, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout}s")
        time.sleep(0.05)


class PrivateRedis:
    """``redis-server --appendonly yes`` on its own port and directory; ``stop()`` shuts
    it down (the append-only file stays), ``start()`` starts it again on the same files."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port("CELERIAC_TEST_PRIVATE_REDIS_PORTS", "6691-6699")
        self.dir = Path(tempfile.mkdtemp(prefix="celeriac-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> str | None:
        """Why this cannot run here (None: it can)."""
        return None if shutil.which("redis-server") else "redis-server is not installed"

    def start(self) -> None:
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken: not starting a private Redis")
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1",
                        "--port", str(self.port), "--appendonly", "yes", "--save", "",
                        "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
                       check=True, capture_output=True)
        _wait(lambda: _port_open(self.port), "the private Redis did not start")

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        _wait(lambda: not _port_open(self.port), "the private Redis did not stop")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if _port_open(self.port):
                self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRabbit:
    """A RabbitMQ node of its own (``ctest<port>@localhost``, data and logs in a temporary
    directory, a cookie of its own); ``stop()`` / ``start()`` are ``rabbitmqctl
    stop_app`` / ``start_app``, as an operator restarts the broker."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port("CELERIAC_TEST_PRIVATE_AMQP_PORTS", "5681-5689")
        self.node = f"ctest{self.port}@localhost"
        self.dir = Path(tempfile.mkdtemp(prefix="celeriac-rabbit-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.dir / "plugins").write_text("[].\n")
        self.env = dict(
            os.environ, HOME=str(home), RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(self.port), RABBITMQ_DIST_PORT=str(self.port + 20000),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"), RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"))
        self._running = False

    @staticmethod
    def available() -> str | None:
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            return "rabbitmq-server is not installed"
        return None

    def _ctl(self, *args: str) -> None:
        subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                       env=self.env, check=True, capture_output=True, timeout=300)

    def launch(self) -> None:
        """Start the node (once)."""
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is taken: not starting a private RabbitMQ")
        subprocess.run([str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"], env=self.env,
                       check=True, capture_output=True)
        self._running = True
        self._ctl("wait", str(self.dir / "pid"))
        _wait(lambda: _port_open(self.port), "the private RabbitMQ did not start")

    def stop(self) -> None:
        self._ctl("stop_app")
        _wait(lambda: not _port_open(self.port), "the private RabbitMQ did not stop")

    def start(self) -> None:
        self._ctl("start_app")
        _wait(lambda: _port_open(self.port), "the private RabbitMQ did not start again")

    def close(self) -> None:
        if self._running:
            with contextlib.suppress(Exception):
                self._ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)

