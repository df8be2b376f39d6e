"""``file:///dir``: one file per task, as Celery's filesystem backend lays them out.

Layout (``ls`` the directory)::

    celery-task-meta-<id>        the Celery meta, result_serializer bytes (Celery reads it)
    celeriac-task-history-<id>   the history, one JSON object per line, oldest first
    celeriac-revoked             revoked task ids, one ``<id> <until epoch s>`` per line
    celeriac-workers/<node>      a worker node's last heartbeat (epoch s, as text)
    celeriac-workers/<node>.tasks/<id>   an empty file per early-acked task it runs

Unlike Celery's backend, a meta file is never written in place: the new bytes go
to a temporary file in the same directory, are fsynced, and are renamed over the
old file, so a reader sees the old meta or the new one, never a torn or empty
file.  Writers for one task take an exclusive ``flock`` on its history file
around read-check-rename-append, which makes the transition rule atomic among
celeriac writers.  The directory is created if missing; task ids that are not
safe file names are refused (see ``protocol.check_task_id``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .. import serialization, states
from ..control import add_revoked
from ..exceptions import DecodeError, ImproperlyConfigured, UnsafeTaskId
from ..protocol import check_task_id
from .base import Backend, Record, RecordsRefused, Roster

if TYPE_CHECKING:
    from ..app import Celeriac

META_PREFIX = "celery-task-meta-"
HISTORY_PREFIX = "celeriac-task-history-"
REVOKED_FILE = "celeriac-revoked"
WORKERS_DIR = "celeriac-workers"
ROSTER_SUFFIX = ".tasks"
#: OSError numbers that refuse a record for good (see ``FileBackend.permanent``).
PERMANENT_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.EFBIG,
                              errno.EINVAL})


def directory_from_url(url: str) -> str:
    """Celery's rule: ``file://localhost/x`` and ``file:///x`` are ``/x``, ``file://x`` is ``x``."""
    if url.startswith("file://localhost/"):
        return url[len("file://localhost"):]
    if url.startswith("file://"):
        path = url[len("file://"):]
        if path:
            return path
    raise ImproperlyConfigured(f"file result backend URL {url!r} names no directory")


class FileBackend(Backend):
    keeps_heartbeats = True

    def __init__(self, app: Celeriac, url: str) -> None:
        super().__init__(app, url)
        self.directory = os.path.abspath(directory_from_url(url))
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise ImproperlyConfigured(
                f"file result backend cannot use directory {self.directory!r}: {exc}"
            ) from exc

    def _meta_path(self, task_id: str) -> str:
        return os.path.join(self.directory, META_PREFIX + check_task_id(task_id))

    def _history_path(self, task_id: str) -> str:
        return os.path.join(self.directory, HISTORY_PREFIX + check_task_id(task_id))

    def _get(self, task_id: str) -> bytes | None:
        try:
            with open(self._meta_path(task_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked_history(self, task_id: str) -> Iterator[int]:
        fd = os.open(self._history_path(task_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def _stored_state(self, task_id: str) -> str | None:
        data = self._get(task_id)
        if not data:
            return None
        try:
            return str(self.decode_meta(data).get("status"))
        except DecodeError:
            return None  # a torn file left by a non-atomic writer: replace it

    def _replace_meta(self, task_id: str, payload: bytes) -> None:
        self._replace(self._meta_path(task_id), payload)

    def _replace(self, path: str, payload: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".celeriac-tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def record(self, records: Sequence[Record], roster: Roster | None = None) -> list[bool]:
        """Each record in turn; one refused for good (:meth:`permanent`) does not stop the
        others, and :class:`RecordsRefused` names it once they are written."""
        if roster is not None and roster.started:
            roster_dir = self._roster_dir(roster.node)
            os.makedirs(roster_dir, exist_ok=True)
            for task_id in roster.started:
                os.close(os.open(os.path.join(roster_dir, check_task_id(task_id)),
                                 os.O_WRONLY | os.O_CREAT, 0o644))
        applied: list[bool] = []
        refused: dict[int, BaseException] = {}
        for n, r in enumerate(records):
            try:
                applied.append(self._record(r))
            except Exception as exc:
                if not self.permanent(exc):
                    raise
                refused[n] = exc
                applied.append(False)
        if roster is not None:
            for task_id in roster.ended:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._roster_dir(roster.node), check_task_id(task_id)))
        if refused:
            raise RecordsRefused(refused)
        return applied

    def permanent(self, exc: BaseException) -> bool:
        """A file system refuses a record for good when the file name is too long for it
        (a long task id), a directory or something else stands where the task's file
        goes, or the file would exceed the size it allows; a full disk, missing
        permissions and I/O errors are waited for."""
        return super().permanent(exc) or (
            isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS)

    def _record(self, r: Record) -> bool:
        with self._locked_history(r.task_id) as fd:
            if r.state is not None:
                if not states.may_replace(self._stored_state(r.task_id), r.state):
                    return False
                assert r.payload is not None
                self._replace_meta(r.task_id, r.payload)
            line = serialization.json_dumps_lenient(r.entry) + "\n"
            os.write(fd, line.encode("utf-8"))
            return True

    def history(self, task_id: str) -> list[dict[str, Any]]:
        try:
            with open(self._history_path(task_id), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def add_revoked(self, task_ids: Sequence[str], until: float) -> None:
        """Rewrite the revoked file (atomically, under a lock) with lapsed ids dropped and
        the newest REVOKES_MAX kept."""
        path = os.path.join(self.directory, REVOKED_FILE)
        fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            kept = self.revoked()
            add_revoked(kept, task_ids, until)
            self._replace(path, "".join(f"{t} {u}\n" for t, u in kept.items()).encode())
        finally:
            os.close(fd)

    def revoked(self) -> dict[str, float]:
        try:
            with open(os.path.join(self.directory, REVOKED_FILE), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return {}
        now = time.time()
        found = {}
        for line in lines:
            task_id, _, until = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                if float(until) >= now:
                    found[task_id] = float(until)
        return found

    # ------------------------------------------------------------------ heartbeats

    def _workers_dir(self) -> str:
        return os.path.join(self.directory, WORKERS_DIR)

    def _node_path(self, node: str) -> str:
        return os.path.join(self._workers_dir(), check_task_id(node))

    def _roster_dir(self, node: str) -> str:
        return self._node_path(node) + ROSTER_SUFFIX

    def _write_heartbeat(self, node: str, at: float) -> None:
        path = self._node_path(node)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(repr(at))
        os.replace(tmp, path)

    def _read_heartbeat(self, node: str) -> float | None:
        try:
            with open(self._node_path(node), encoding="ascii") as f:
                return float(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def heartbeat(self, node: str, at: float) -> None:
        os.makedirs(self._workers_dir(), exist_ok=True)
        self._write_heartbeat(node, at)

    def stale_nodes(self, before: float) -> dict[str, float]:
        try:
            names = os.listdir(self._workers_dir())
        except FileNotFoundError:
            return {}
        found = {}
        for name in names:
            if name.endswith((ROSTER_SUFFIX, ".tmp", ".lock")):
                continue
            with contextlib.suppress(UnsafeTaskId):
                seen = self._read_heartbeat(name)
                if seen is not None and seen < before:
                    found[name] = seen
        return found

    def claim_node(self, node: str, before: float, now: float) -> list[str] | None:
        fd = os.open(os.path.join(self._workers_dir(), ".lock"), os.O_WRONLY | os.O_CREAT,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # among claimants; the node itself never waits
            seen = self._read_heartbeat(node)
            if seen is None or seen >= before:
                return None
            self._write_heartbeat(node, now)
        finally:
            os.close(fd)
        try:
            return sorted(os.listdir(self._roster_dir(node)))
        except FileNotFoundError:
            return []

    def forget_node(self, node: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._node_path(node))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._roster_dir(node))

    def forget(self, task_id: str) -> None:
        for path in (self._meta_path(task_id), self._history_path(task_id)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def cleanup(self, older_than: float) -> int:
        """Unlink ready metas (and their histories) whose file was last written before
        ``older_than`` (real epoch seconds, whatever the app's time zone), and the
        histories of tasks sent before it that no worker ever took."""
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name.startswith(HISTORY_PREFIX):
                removed += self._expire_unrun(entry, older_than)
            if not entry.name.startswith(META_PREFIX):
                continue
            task_id = entry.name[len(META_PREFIX):]
            try:
                if entry.stat().st_mtime >= older_than:
                    continue
                with self._locked_history(task_id):
                    if self._stored_state(task_id) not in states.READY_STATES:
                        continue
                    os.unlink(entry.path)
                    os.unlink(self._history_path(task_id))
                removed += 1
            except (FileNotFoundError, UnsafeTaskId):
                continue  # removed meanwhile, or not a file celeriac would write
        return removed

    def _expire_unrun(self, entry: os.DirEntry[str], older_than: float) -> int:
        """Unlink the history of a task no worker ever took — no meta, the newest entry
        the producer's PENDING — last written before ``older_than``; 1 when removed."""
        task_id = entry.name[len(HISTORY_PREFIX):]
        try:
            if entry.stat().st_mtime >= older_than or os.path.exists(self._meta_path(task_id)):
                return 0
            with self._locked_history(task_id):
                history = self.history(task_id)
                if (os.path.exists(self._meta_path(task_id)) or not history
                        or history[-1].get("state") != states.PENDING
                        or float(history[-1].get("timestamp", 0)) >= older_than):
                    return 0
                os.unlink(entry.path)
            return 1
        except (FileNotFoundError, UnsafeTaskId, TypeError, ValueError):
            return 0  # removed meanwhile, or not a file celeriac would write

    def exists(self, task_id: str) -> bool:
        return os.path.exists(self._meta_path(task_id)) or os.path.exists(
            self._history_path(task_id)
        )

