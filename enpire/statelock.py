"""One daemon per state directory: an exclusive `flock` on `DIR/daemon.lock`, held for the daemon's life.

The kernel drops the lock when the holder's process ends, however it ends (SIGKILL included), so a
crashed daemon never leaves a stale lock behind. The holder writes its pid into the file so that a
refused second daemon can name it.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_FILE = "daemon.lock"


class StateDirLocked(RuntimeError):
    """Another process holds the state directory."""

    def __init__(self, state_dir: Path, holder: int | None):
        self.holder = holder
        who = f"pid {holder}" if holder else "a process whose pid it did not record"
        super().__init__(f"{state_dir}: another fleet daemon ({who}) is using this state directory; "
                         "stop it or use a different --state-dir")


def holder_pid(state_dir: Path) -> int | None:
    """The pid written by the last process that took the lock (it may have ended since)."""
    try:
        return int((Path(state_dir) / LOCK_FILE).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def held(state_dir: Path) -> bool:
    """Whether a daemon holds the state directory now: a shared lock, tried and dropped at once (a daemon
    starting meanwhile retries, see `acquire`). The kernel's answer, so a killed daemon is seen at once."""
    try:
        fd = os.open(Path(state_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return False


class StateLock:
    """Take with `acquire()` (raises StateDirLocked when held); `release()` or process exit frees it."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        # O_CLOEXEC (Python's default): cell and sandbox processes never inherit the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        for attempt in range(3):  # a daemon holds it for its life; `held` probes (status) for a moment only
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 2:
                    os.close(fd)
                    raise StateDirLocked(self.path.parent, holder_pid(self.path.parent)) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
