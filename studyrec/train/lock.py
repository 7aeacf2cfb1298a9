"""One job per run directory: an advisory lock on ``<run dir>/.lock`` held for the whole job.

The lock is ``fcntl.flock`` on the file, taken without waiting: a second job on the same
directory is refused at once, naming the process that holds it (pid, host, start time, command,
written into the file after the lock is taken). The kernel releases the lock when its process
ends, however it ends, so a lock file left by a killed job never blocks a resume. The file itself
stays; only the lock on it counts. On a file system without locks (Lustre mounted without
``flock``, say) the job goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""flock errors that mean the file system has no locks."""

logger = logging.getLogger("studyrec.train")


class RunDirectoryBusy(ValueError):
    """Another process holds the run directory's lock (bad input: exit code 2)."""


def _holder_record() -> str:
    return json.dumps({
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]),  # as typed: python -m ...
    })


def describe_holder(text: str) -> str:
    """Who holds the lock, from the lock file's text (empty while the holder is still writing it)."""
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}, "
                f"command: {holder['command']}")
    except (ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"


class RunDirectoryLock:
    """Holds ``run_dir``'s lock from ``acquire`` (or ``with``) until ``release`` or the process ends.

    ``acquire`` creates the directory when needed; it raises :class:`RunDirectoryBusy` when another
    process holds the lock, and ``PermissionError`` when the lock file cannot be created.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirectoryLock:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise RunDirectoryBusy(
                f"--output-dir {self.run_dir} is in use by {holder}; wait for that job to end or stop it "
                f"(kill the pid), or choose another --output-dir"
            ) from None
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                os.close(fd)
                raise
            logger.warning("%s: this file system has no locks (%s); nothing stops a second job from writing "
                           "into --output-dir %s at the same time", self.path, e.strerror, self.run_dir)
        self._fd = fd
        self._write(_holder_record())
        return self

    def _open(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        except OSError as e:
            raise PermissionError(
                f"--output-dir {self.run_dir}: cannot create the lock file {self.path} ({e.strerror}); "
                "choose another directory"
            ) from None

    def _write(self, text: str) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode(), 0)

    def release(self) -> None:
        """Clears the holder's record and lets the next job in (idempotent)."""
        if self._fd is None:
            return
        try:
            self._write("")
        finally:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
