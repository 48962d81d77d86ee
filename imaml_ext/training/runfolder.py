"""The run folder of a training: one training at a time, and no debris from a killed one.

:class:`RunLock` holds an exclusive OS lock (``fcntl.flock``) on
``<run>/run.lock`` for a whole training run and writes the holder's PID
into it.  The operating system releases the lock when the process ends,
however it ends (exit, exception, SIGKILL, crash), so a lock file left by a
dead process never blocks; a second training into a folder whose run is
alive fails at once with :class:`RunFolderBusyError`, naming the folder and
the PID.  The lock file itself stays (deleting it would let two processes
lock two different files of the same name).

Under the lock, :meth:`RunLock.remove_partials` deletes the temporary files
that :func:`~imaml_ext.data.paths.atomic_file` leaves when its process is
killed mid-write (no other process can be writing in the folder then).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from ..data.paths import partial_files

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind; runs are not guarded there
    fcntl = None

__all__ = ["LOCK_NAME", "RunError", "RunFolderBusyError", "RunLock", "check_not_busy"]

LOCK_NAME = "run.lock"


class RunError(ValueError):
    """A training cannot start or continue as asked (reported in one message, no traceback)."""


class RunFolderBusyError(RunError):
    """Another live process is training into the same run folder."""


def _lock_or_raise(path: Path, flags: int) -> int:
    """A descriptor of ``path`` holding its exclusive flock, or :class:`RunFolderBusyError`
    naming the folder and the PID written in the file."""
    fd = os.open(path, flags, 0o666)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusyError(
                f"{path.parent} is in use by another training (PID {holder}, lock {path}); "
                f"wait for it to end or stop it, or choose another --out") from None
    return fd


def check_not_busy(folder: os.PathLike) -> None:
    """Raise :class:`RunFolderBusyError` if a live process holds ``folder``'s lock (creates nothing)."""
    path = Path(folder) / LOCK_NAME
    if path.is_file():
        os.close(_lock_or_raise(path, os.O_RDONLY))


class RunLock:
    """``with RunLock(folder):`` — an exclusive lock on ``folder`` (created if missing) for the block.

    Raises :class:`RunFolderBusyError` at once if another process holds it.
    """

    def __init__(self, folder: os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = _lock_or_raise(self.path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    def remove_partials(self) -> List[Path]:
        """Delete the temporary files a killed writer left in the folder; return them.
        Only while the lock is held."""
        if self._fd is None:
            raise RuntimeError("remove_partials needs the lock held")
        removed = partial_files(self.folder)
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            print(f"{self.folder}: removed {len(removed)} unfinished temporary file(s) of an interrupted "
                  f"write: {', '.join(p.name for p in removed)}", file=sys.stderr)
        return removed
