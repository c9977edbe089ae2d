"""One run per output folder: an exclusive lock held for the run's life.

The lock is ``fcntl.flock`` on the file ``run.lock`` in the output folder, which
holds the process id of its holder. The operating system releases a ``flock``
when its process ends, however it ends (``kill -9`` included), so a dead run's
lock is recovered by the next run without any clean-up; the file itself stays
and is harmless. A second run started into a held folder fails at once with
:class:`FolderLocked`, naming the process that holds it.

On platforms without ``fcntl`` (Windows) the lock is not taken.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "FolderLocked", "OutputLock"]

LOCK_FILE = "run.lock"
"""The lock file's name in the output folder."""


class FolderLocked(OSError):
    """Another live process holds the output folder's lock."""


class OutputLock:
    """The exclusive lock of output folder ``folder`` (created if missing); use as a context
    manager, or :meth:`acquire` and :meth:`release`."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock, or raise :class:`FolderLocked` naming the process that holds it."""
        if fcntl is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise FolderLocked(f"{self.path.parent} is in use by another run (process {holder} holds "
                               f"{self.path}): wait for it to end, stop it, or choose another output "
                               "folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (the file stays; the next run takes it over)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
