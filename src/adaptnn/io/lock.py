"""One writer per run directory: an advisory lock on ``<run_dir>/.adaptnn.lock``.

:class:`RunLock` takes an exclusive, non-blocking ``flock`` on the lock file (``msvcrt.locking`` where there
is no ``fcntl``). The operating system drops the lock when the holder's process ends, however it ends
(``kill -9`` included), so a crashed writer never leaves a stale lock behind on a local file system. The
holder writes its PID, host, command and start time into the file so that a refused writer can name it.

The lock is re-entrant within a process (``evaluate_run`` calling ``calibrate_run`` takes it once), and the
lock file is never deleted: deleting it while another process has it open would let two writers each lock a
different file. After acquiring, the holder checks that the file it locked is still the one at the path (a
run directory swapped in by ``--overwrite`` brings its own lock file) and retries otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import AdaptnnError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "lock_holder"]

#: the lock file inside a run directory
LOCK_NAME = ".adaptnn.lock"
_WINDOWS_LOCK_OFFSET = 1 << 30  # lock a byte far past the holder record, which stays readable


class RunLockedError(AdaptnnError, RuntimeError):
    """Another process is writing the run directory (the message names it and how to break a stale lock)."""


class _Held:
    """One locked file descriptor of this process and how many :class:`RunLock` s share it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.depth = 1


_HELD: dict[str, _Held] = {}
_HELD_GUARD = threading.Lock()


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What the lock file of ``run_dir`` says about its (last) holder: ``pid``, ``host``, ``command``, ``since``.

    Empty when the file is missing or unreadable. The record stays after the holder ends; only the lock
    itself says whether a writer is active.
    """
    try:
        data = json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _command() -> str:
    """This process's command line, with adaptnn's entry points shown as ``adaptnn``."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    if first.name == "adaptnn" or (first.name == "__main__.py" and "adaptnn" in first.parts):
        argv[0] = "adaptnn"
    elif first.name == "__main__.py":
        argv[0] = f"python -m {first.parent.name}"
    return " ".join([argv[0], shlex.join(argv[1:])]).strip()


class RunLock:
    """Exclusive writer lock of a run directory (created if missing), as a context manager.

    Args:
        run_dir: the run directory; the lock file is ``run_dir/.adaptnn.lock``.
        command: what the holder is doing, recorded for refused writers (default: this process's argv).

    Raises:
        RunLockedError: on entry, when another process holds the lock.
    """

    def __init__(self, run_dir: str | os.PathLike, *, command: str | None = None) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_NAME
        self.command = command if command is not None else _command()
        self._key = str(self.path)
        self._entered = False

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._entered

    def acquire(self) -> RunLock:
        """Take the lock (re-entrant within this process)."""
        if self._entered:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None:
                held.depth += 1
                self._entered = True
                return self
            fd = self._lock_file()
            _HELD[self._key] = _Held(fd)
        self._entered = True
        return self

    def _lock_file(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise RunLockedError(self._refusal())
            if _same_file(fd, self.path):
                self._record(fd)
                return fd
            os.close(fd)  # the directory was swapped while we opened it: lock the file now at the path
        raise RunLockedError(f"could not lock {self.path}: the run directory keeps being replaced")

    def _record(self, fd: int) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def _refusal(self) -> str:
        holder = lock_holder(self.run_dir)
        who = f"PID {holder.get('pid', '?')}"
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on {holder['host']}"
        if holder.get("command"):
            who += f" ({holder['command']})"
        if holder.get("since"):
            who += f" since {holder['since']}"
        return (
            f"run directory {self.run_dir} is being written by {who}; wait for it to finish, or, if that process "
            f"is gone, delete {self.path}"
        )

    def release(self) -> None:
        """Drop this object's hold; the file is unlocked when the last holder in the process releases it."""
        if not self._entered:
            return
        self._entered = False
        with _HELD_GUARD:
            held = _HELD[self._key]
            held.depth -= 1
            if held.depth == 0:
                del _HELD[self._key]
                os.close(held.fd)  # closing the descriptor releases flock / msvcrt locks

    def swap_with(self, other: RunLock) -> None:
        """Exchange the locked files of two held locks, after their directories were exchanged on disk.

        The lock file now at ``self.path`` is the one ``other`` had locked and vice versa, so each object
        keeps holding the file at its own path.
        """
        if not (self._entered and other._entered):
            raise RuntimeError("swap_with needs two held locks")
        with _HELD_GUARD:
            a, b = _HELD[self._key], _HELD[other._key]
            a.fd, b.fd = b.fd, a.fd

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
