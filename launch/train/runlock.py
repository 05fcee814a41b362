"""One run per out_dir: an exclusive flock on <out_dir>/run.lock, held by rank 0 for the life of the run.

Two runs writing one out_dir (a manual relaunch beside a requeued job) would delete or interleave each other's
checkpoint files. flock belongs to the open file, so the kernel drops it when the holder exits, however it exits
(SIGKILL and OOM included): there is no stale lock to clean up, and a requeued Slurm job starts as soon as the old
job's processes are gone. The file's text names the holder (host, pid, Slurm job id) for the refusal message.
Forked children (loader workers, compile workers) close their copy at once, so none of them can keep a dead run's
lock alive. On a file system without flock support the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from launch.config import warn

LOCK_NAME = "run.lock"
SAME_JOB_WAIT_S = 60.0
"""A requeued Slurm job may start while the old job's processes are still being torn down: when the holder is
the same job id, wait this long for its lock to go before refusing."""
_HOLDER_BYTES = 4096

_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)  # closing a forked copy does not unlock: the parent's descriptor still holds the lock
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLocked(ValueError):
    """Another live run holds out_dir (a ValueError: the CLI reports it as one line, exit code 2)."""


@dataclass
class RunLock:
    path: Path
    fd: int
    """-1 when the file system does not support flock (nothing is held)."""

    def release(self) -> None:
        if self.fd < 0:
            return
        _held.discard(self.fd)
        try:
            os.ftruncate(self.fd, 0)  # the text names a live holder only
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the lock
        self.fd = -1


def _me() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def read_holder(path: Path) -> dict[str, object]:
    """What the holder wrote into the lock file ({} when unreadable, empty or not ours)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(_HOLDER_BYTES).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(holder: dict[str, object]) -> str:
    if not holder:
        return "holder unknown: it has not written its name yet"
    parts = [f"host {holder.get('host')!s:.100}", f"pid {holder.get('pid')!s:.20}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']!s:.40}")
    return ", ".join(parts)


def _try_lock(fd: int) -> bool:
    """True when locked; False when another open file holds it. Raises OSError when flock is unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _locked_by_other(path: Path, fd: int) -> dict[str, object] | None:
    """Take the lock on fd, waiting a while for a dying instance of the same Slurm job; None when taken, else the
    holder's description."""
    job = os.environ.get("SLURM_JOB_ID")
    deadline = time.monotonic() + SAME_JOB_WAIT_S
    while True:
        if _try_lock(fd):
            return None
        holder = read_holder(path)
        if not (job and holder.get("slurm_job_id") == job and time.monotonic() < deadline):
            return holder
        time.sleep(1.0)


def acquire(out_dir: Path) -> RunLock:
    """Lock out_dir for this process until release() or exit; RunDirLocked names the live holder."""
    path = Path(out_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        holder = _locked_by_other(path, fd)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            warn(f"{path}: this file system does not support flock ({e.strerror}); nothing stops a second run from "
                 f"writing {out_dir} at the same time")
            return RunLock(path, -1)
        raise
    if holder is not None:
        os.close(fd)
        raise RunDirLocked(f"{out_dir} is in use by another cloze run ({describe(holder)}; lock file {path}); wait "
                           f"for that run to end or stop it, or give this run another out_dir")
    _held.add(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_me()).encode(), 0)
    return RunLock(path, fd)


def check_free(out_dir: Path) -> None:
    """Raise RunDirLocked when a live run holds out_dir; take nothing (the launcher's check before it starts the
    ranks, so the refusal is one line; rank 0's acquire() is the lock itself)."""
    if (Path(out_dir) / LOCK_NAME).is_file():
        acquire(out_dir).release()
