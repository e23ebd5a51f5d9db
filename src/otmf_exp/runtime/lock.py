"""Run-directory ownership: one run at a time writes into a directory (``<out_dir>/.lock``).

The lock is an ``flock`` on ``<out_dir>/.lock``, which holds the owner's PID and host. The kernel
releases it when the owning process exits, however it exits (SIGKILL, OOM, a crash), so a lock
left behind by a dead run is never stale: the next run simply takes it. A second live run on the
same directory gets one line naming the owner. The file is removed when the owner releases it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from otmf_exp.errors import UserError
from otmf_exp.runtime.files import open_nofollow

LOCK_NAME = ".lock"


class RunDirLock:
    """``with RunDirLock(out_dir): ...`` owns ``out_dir`` for the block, or raises :class:`UserError`."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # a planted link: one line
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"run directory {self.path.parent} is in use by another run ({owner}); wait for "
                    "it to finish or choose another out_dir"
                ) from None
            # the previous owner may have removed the file between our open and our lock: only a
            # lock on the file that is at the path now counts
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while holding the lock (see acquire)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
