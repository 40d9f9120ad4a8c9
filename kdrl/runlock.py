"""One writer per run directory: an advisory ``flock`` on ``runs/<run_id>/.lock``.

Two ``kdrl train`` processes on the same run id would interleave iterations and overwrite each
other's checkpoints, so the driver holds ``hold_run_lock(run_dir)`` for the whole run and a
second one is refused at once with ``RunLockedError`` naming the holder.

Why ``flock`` and not a PID file:

- The kernel drops the lock when the holder's last file descriptor closes, which includes the
  process dying by ``kill -9``, OOM or a power cut of the process tree. A stale lock cannot block
  the next run, and nobody has to guess whether a recorded PID is still alive.
- The file is never deleted (unlinking it while another process waits on the old inode would
  let two processes each believe they hold "the" lock); its content is only a note about the
  holder (``{"pid", "host", "started"}``), rewritten on every acquisition and meaningful only
  while the file is locked.
- Locks belong to the open file description, not the process: a second ``hold_run_lock`` on the
  same directory from the same process is refused too, and a child made by ``fork`` shares the
  parent's lock until it exits.
- ``flock`` is local to a machine; on NFS it may not exclude processes on other hosts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is locked by another ``kdrl train`` (``holder`` says which)."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = Path(run_dir), holder
        pid = holder.get("pid")
        who = (
            f"PID {pid} on {holder.get('host')} since {holder.get('started')}"
            if pid is not None
            else "a process that has not recorded itself yet"
        )
        stop = f"stop PID {pid}" if pid is not None else f"see {self.run_dir / LOCK_NAME}"
        super().__init__(
            f"run {self.run_dir} is locked by {who}: another `kdrl train` is using this run; "
            f"wait for it, or {stop} (a killed holder releases the lock by itself)"
        )


@contextmanager
def hold_run_lock(run_dir: str | os.PathLike, *, wait_s: float = 0.5) -> Iterator[dict]:
    """Hold the exclusive lock of ``run_dir`` (created if needed); yields the holder note written.

    ``wait_s`` only rides out ``lock_holder`` probes, which take a shared lock for microseconds;
    a real holder keeps the lock, so the call then raises ``RunLockedError``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with hold_run_lock(Path(d) / "run") as me:
    ...         try:
    ...             with hold_run_lock(Path(d) / "run"):
    ...                 pass
    ...         except RunLockedError as err:
    ...             refused = f"PID {me['pid']}" in str(err)
    ...     (refused, lock_holder(Path(d) / "run"))
    (True, None)
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # No O_TRUNC: the file may be locked by someone else, whose note we must not wipe.
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock_exclusive(fd, run_dir, wait_s=wait_s)
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        try:
            yield note
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """The holder note (``pid``, ``host``, ``started``) if the run is locked now, else None.

    Non-destructive: takes a shared lock for an instant (it fails while anyone holds the
    exclusive one) and never creates the directory or the lock file. A holder that has locked but
    not yet written its note reads as ``{"pid": None, "host": None, "started": None}``. The
    calling process's own ``hold_run_lock`` counts as a holder too.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     before = lock_holder(Path(d) / "nothing-here")
    ...     with hold_run_lock(Path(d) / "run") as me:
    ...         during = lock_holder(Path(d) / "run")
    ...     (before, during == me, lock_holder(Path(d) / "run"))
    (None, True, None)
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            return _read_note(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_exclusive(fd: int, run_dir: Path, *, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
        if time.monotonic() >= deadline:
            raise RunLockedError(run_dir, _read_note(fd))
        time.sleep(0.01)


def _read_note(fd: int) -> dict:
    empty = {"pid": None, "host": None, "started": None}
    try:
        note = json.loads(os.pread(fd, 4096, 0) or b"null")
    except ValueError:  # half-written by a holder that just acquired
        return empty
    return {**empty, **note} if isinstance(note, dict) else empty
