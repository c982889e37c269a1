"""The sweep's locks: who is alive, and one writer at a time.

Live workers and trials hold fcntl locks in ``<sweep_dir>/locks`` (which shared file systems with locking honour
across nodes; the kernel releases the lock of a process that dies): that is how a worker tells a stopped trial
from a running one. Creating the study, claiming trials and appending to the journal take a lock file created
with open(O_EXCL) instead, which works on NFS too.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .spec import SweepSpec

LOCKS_DIR = "locks"


class LiveLock:
    """An exclusive fcntl lock on a file, held while its holder lives (released by the kernel when it dies)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:  # who holds it, for messages only: a full disk does not stop the worker here
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        except OSError:
            pass
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"


def held_by_someone(path: Path) -> bool:
    """Whether a live process holds the lock on ``path`` (never call it for a lock this process holds)."""
    if not path.exists():
        return False
    probe = LiveLock(path)
    if probe.acquire():
        probe.release()
        return False
    return True


def worker_lock_file(spec: SweepSpec, worker: str) -> Path:
    return spec.sweep_dir / LOCKS_DIR / f"worker-{worker}.lock"


def trial_lock_file(spec: SweepSpec, number: int) -> Path:
    return spec.sweep_dir / LOCKS_DIR / f"trial_{number:04d}.lock"


def default_worker_id() -> str:
    """The SLURM array task (``<array job>_<task>``, the same after a requeue), the job, or this host."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID") or socket.gethostname()


@contextmanager
def holding(lock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def shared_file_lock(path: Path):
    """``<path>.lock``, created with open(O_EXCL), which works on NFS where workers on several nodes share the file."""
    from optuna.storages.journal import JournalFileOpenLock

    return JournalFileOpenLock(str(path))


@contextmanager
def claim_lock(spec: SweepSpec) -> Iterator[None]:
    """One worker at a time creates the study and claims trials (a lock file that works on NFS too)."""
    with holding(shared_file_lock(spec.sweep_dir / "claim")):
        yield
