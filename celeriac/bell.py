"""Wake-ups between processes on one machine, so nobody polls.

A *bell* is a directory of Unix datagram sockets, one per listening process.
``ring()`` sends one byte to every socket in it whose name ends in ``.idle``; a
listener's socket becomes readable, which a thread can ``wait()`` for and an
event loop can watch with ``add_reader``.  A socket whose process died refuses
the byte and is removed.  Rings carry no data: a listener that wakes re-reads
the store it cares about, so a lost or merged ring costs latency (bounded by the
caller's fallback timeout), never correctness.

A worker renames its socket to ``.busy`` while it has work and back to ``.idle``
before it re-checks the store and sleeps, so a producer does not spend a system
call per message on workers that will fetch anyway.

The directory sits beside the store file (``celeriac.db-bell/``), unless that
path is too long for a socket name; then it goes under the temporary directory,
named by a hash of the store's path.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import select
import socket
import tempfile
import threading
import time

#: Longest socket path the kernel takes is 107 bytes; leave room for the socket's name.
_MAX_DIR = 107 - len("/4194304-0123abcd.idle")


def bell_dir(store_path: str, channel: str) -> str:
    """The bell directory of a store file for one channel (``queues`` or ``results``)."""
    path = os.path.realpath(store_path)
    beside = f"{path}-bell/{channel}"
    if len(beside.encode()) <= _MAX_DIR:
        return beside
    digest = hashlib.sha1(path.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"celeriac-{digest}", channel)


class Bell:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self, everyone: bool = False) -> None:
        """Wake the idle listeners (``everyone``: the busy ones too)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if everyone or name.endswith(".idle"):
                self._send(os.path.join(self.directory, name))

    def _send(self, path: str) -> None:
        try:
            self._sock.sendto(b"\x01", path)
        except BlockingIOError:
            pass  # its buffer is full: it has been rung already
        except ConnectionRefusedError:  # nobody is bound to it: its process is gone
            with contextlib.suppress(OSError):
                os.unlink(path)
        except OSError:
            pass  # renamed meanwhile (idle <-> busy), or not a socket: not ours to remove

    def close(self) -> None:
        self._sock.close()


class Listener:
    """One process's end of a bell.  Belongs to the process that made it: after a
    fork the child makes its own, and only the owner removes the socket file."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.pid = os.getpid()
        self._stem = os.path.join(directory, f"{self.pid}-{os.urandom(4).hex()}")
        self.path = self._stem + ".idle"
        self._sock = self._bind(self.path)
        self.generation = 0  # counts new sockets (whoever watches the old one must re-watch)
        atexit.register(self.close)
        _sweep(directory)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        return sock

    @property
    def is_idle(self) -> bool:
        return self.path.endswith(".idle")

    def _mark(self, suffix: str) -> None:
        target = self._stem + suffix
        if target == self.path:
            return
        try:
            os.rename(self.path, target)
        except FileNotFoundError:  # removed from outside: bind a new socket under the name
            self._sock.close()
            self._sock = self._bind(target)
            self.generation += 1
        self.path = target

    def idle(self) -> None:
        """Ring me: I am about to re-check the store and sleep (re-check *after* this)."""
        self._mark(".idle")

    def busy(self) -> None:
        """Do not ring me: I will look at the store before I sleep again."""
        self._mark(".busy")

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
        if self._sock.fileno() == -1:
            return
        atexit.unregister(self.close)
        if self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._sock.close()


class SharedListener:
    """One listener for all the threads of a process that wait on a bell (``get()`` in
    many threads): one socket, one socket file, one ring per process per commit.

    A thread notes :attr:`rings` *before* it reads the store, then waits (:meth:`wait`) for
    that count to change.  One waiting thread at a time sleeps on the socket and counts
    each ring it takes; the others sleep on a condition it notifies.  A ring that comes
    while nobody sleeps on the socket stays queued in it, so none is lost.  A forked
    child gets its own (:func:`shared_listener`)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self._listener: Listener | None = None
        self._cond = threading.Condition()
        self._leading = False
        #: rings taken so far
        self.rings = 0

    def start(self) -> int:
        """Listen (from now on no ring is missed); returns :attr:`rings` to wait on."""
        with self._cond:
            if self._listener is None:
                self._listener = Listener(self.directory)
            return self.rings

    def wait(self, seen: int, timeout: float) -> bool:
        """Block until a ring after ``seen`` was taken, or ``timeout`` s pass; True when
        rung."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.rings == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if self._leading or self._listener is None:
                    self._cond.wait(remaining)
                    continue
                self._leading = True  # this thread sleeps on the socket for all
                listener = self._listener
                self._cond.release()
                try:
                    rung = listener.wait(remaining)
                except (OSError, ValueError):  # closed meanwhile (close())
                    rung = False
                finally:
                    self._cond.acquire()
                    self._leading = False
                if rung:
                    self.rings += 1
                self._cond.notify_all()  # the rung wake up; one of the others leads next
            return True

    def close(self) -> None:
        with self._cond:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._cond.notify_all()


_shared: dict[str, SharedListener] = {}
_shared_lock = threading.Lock()


def shared_listener(directory: str) -> SharedListener:
    """This process's :class:`SharedListener` on ``directory``."""
    with _shared_lock:
        found = _shared.get(directory)
        if found is None:
            found = _shared[directory] = SharedListener(directory)
        return found


def _forget_shared_after_fork() -> None:
    """In a forked child: the parent's listeners are not ours (their sockets are closed
    here, their files left to the parent), and their locks may be held by threads that
    do not exist here."""
    global _shared_lock
    _shared_lock = threading.Lock()
    for shared in _shared.values():
        if shared._listener is not None:
            shared._listener.close()  # only the owner removes the file
    _shared.clear()


os.register_at_fork(after_in_child=_forget_shared_after_fork)


def _sweep(directory: str) -> None:
    """Remove sockets nobody is bound to any more (processes killed before they could):
    each is probed, and only a refused probe removes it; live listeners just wake."""
    Bell(directory).ring(everyone=True)
