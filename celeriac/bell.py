"""Wake-ups between processes on one machine, so nobody polls.

A *bell* is a directory of Unix datagram sockets, one per listening process.
``ring()`` sends one byte to every socket in it; a listener's socket becomes
readable, which a thread can ``wait()`` for and an event loop can watch with
``add_reader``.  A socket whose process died refuses the byte and is removed.
Rings carry no data: a listener that wakes re-reads the store it cares about,
so a lost or merged ring costs latency (bounded by the caller's fallback
timeout), never correctness.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import tempfile


def bell_dir(store_path: str, channel: str) -> str:
    """The bell directory for a store file; kept short (socket paths max out at 108 bytes)."""
    digest = hashlib.sha1(os.path.realpath(store_path).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"celeriac-{digest}", channel)


class Bell:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                self._sock.sendto(b"\x01", path)
            except BlockingIOError:
                pass  # its buffer is full: it has been rung already
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    def close(self) -> None:
        self._sock.close()


class Listener:
    """One process's end of a bell."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{os.getpid()}-{os.urandom(4).hex()}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> None:
        try:
            while True:
                self._sock.recv(64)
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        """Block until rung or ``timeout`` seconds pass; True when rung."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if ready:
            self.drain()
        return bool(ready)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._sock.close()
