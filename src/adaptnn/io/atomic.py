"""Atomic file writes: a crash mid-write leaves the previous file intact, never a truncated one.

Data goes to a temporary file in the target's directory, is flushed and fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows); the directory is fsynced so the rename survives a
power loss too. A writer killed mid-write leaves its hidden temporary file (``.<name>.<random>.tmp``)
behind; :func:`sweep_temp_files` removes those, and must only run while no one else writes the directory
(under :class:`~adaptnn.io.lock.RunLock`). :func:`exchange_dirs` swaps two directories in one step.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "exchange_dirs", "fsync_dir", "sweep_temp_files"]

#: the names ``tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")`` gives
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else ``0o666`` less the process umask (as ``open()`` would create)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    try:  # Linux exposes the umask without changing it (os.umask would, process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600 files: give the result the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames in ``directory`` durable (best effort: not every platform can fsync a directory)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sweep_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files killed writers left under ``directory`` (recursively); returns them.

    Only safe while nobody else writes ``directory``: a live writer's temporary file looks the same.
    """
    removed = []
    for root, _, files in os.walk(directory):
        for name in files:
            if _TEMP_NAME.match(name):
                path = Path(root) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)  # the symbols already loaded: libc on Linux, libSystem on macOS
    except (OSError, TypeError):
        return None


def exchange_dirs(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap two existing paths on one file system in one atomic step (no moment where either is missing).

    Linux ``renameat2(RENAME_EXCHANGE)`` or macOS ``renamex_np(RENAME_SWAP)``; both parents are fsynced.

    Raises:
        OSError: with ``errno.ENOTSUP`` where the platform or file system cannot exchange atomically (the
            caller chooses a fallback), or the error of the system call.
    """
    libc = _libc()
    fa, fb = os.fsencode(os.fspath(a)), os.fsencode(os.fspath(b))
    if libc is not None and sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, fa, at_fdcwd, fb, ctypes.c_uint(rename_exchange))
    elif libc is not None and sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        result = libc.renamex_np(fa, fb, ctypes.c_uint(rename_swap))
    else:
        raise OSError(errno.ENOTSUP, "atomic directory exchange is not available on this platform")
    if result != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            code = errno.ENOTSUP
        raise OSError(code, f"cannot exchange {os.fspath(a)} and {os.fspath(b)}: {os.strerror(code)}")
    for parent in {Path(a).parent, Path(b).parent}:
        fsync_dir(parent)
