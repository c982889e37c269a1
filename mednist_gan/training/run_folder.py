"""The run folder before and around training: its lock (one training process per folder), the run info (resolved
config, git revision) and the log lines of the main process, which go to ``train.log`` once the run may write."""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..config import Config
from ..errors import OutputError, first_line, output_error
from ..files import CONFIG_FILE, GIT_REVISION_FILE, LOCK_FILE, LOG_FILE, write_atomic

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def git_revision(cwd: Optional[Path] = None) -> Optional[str]:
    """The checkout's commit (with ``-dirty`` when modified), or None outside a git checkout."""
    here = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, cfg: Config) -> Optional[str]:
    """Main process: the resolved config and git revision, written before training starts."""
    revision = git_revision()
    try:
        write_atomic(run_dir / CONFIG_FILE, cfg.to_yaml())
        write_atomic(run_dir / GIT_REVISION_FILE, (revision or "unknown (not a git checkout)") + "\n")
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    return revision


_locked: dict[Path, int] = {}  # run directories this process trains in: the descriptor holding each lock


def lock_run_dir(run_dir: Path) -> None:
    """Main process, before it writes anything there: hold ``<run_dir>/.lock`` for as long as it trains in
    ``run_dir`` (``unlock_run_dir``, or the end of the process: the kernel releases the lock of a killed
    process, so a lock file left behind never blocks). Another process that holds it: one line, exit 2."""
    key = Path(run_dir).resolve()
    if key in _locked:  # this process already trains here (a Trainer made again on the same run_dir)
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, host, *_ = os.read(fd, 256).decode(errors="replace").split() + ["?", "?"]
        os.close(fd)
        raise OutputError(f"run_dir {run_dir} is in use by another training process (pid {pid} on host {host}); "
                          "wait for it to finish, or choose another run_dir") from None
    except OSError as exc:  # a file system without flock (e.g. Lustre mounted without it): train unguarded
        logging.getLogger("mednist_gan").warning(
            "run_dir %s cannot be locked (%s): make sure no other training process uses it", run_dir,
            exc.strerror or first_line(exc))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as exc:
        os.close(fd)
        raise output_error("run_dir", run_dir, exc) from None
    _locked[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Let other processes train in ``run_dir`` again (the lock file stays: the lock is on it, not its existence)."""
    fd = _locked.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def setup_logging(run_dir: Optional[Path], is_main: bool) -> logging.Logger:
    """Log lines go to the console, and on the main process to ``<run_dir>/train.log`` from ``open_log_file``
    on (the lines before it are kept until then); the other processes log warnings only."""
    logger = logging.getLogger("mednist_gan")
    for handler in list(logger.handlers):  # an earlier run in this process: close its train.log
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    logger.addHandler(console)
    if is_main and run_dir is not None:  # flushLevel above every level: held until open_log_file
        logger.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))
    return logger


def open_log_file(logger: logging.Logger, run_dir: Path) -> None:
    """Main process, once the run may write to ``run_dir``: append the lines so far, and those to come, to train.log."""
    try:
        file_handler = logging.FileHandler(run_dir / LOG_FILE, errors="backslashreplace")  # non-UTF-8 file names
    except OSError as exc:
        raise output_error("run_dir", run_dir, exc) from None
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for held in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file_handler)
        held.close()  # writes its lines to train.log
        logger.removeHandler(held)
    logger.addHandler(file_handler)


def close_log_file(logger: logging.Logger) -> None:
    """At the end of a run: later lines of this process (an export, another run) do not go to its train.log."""
    for handler in [h for h in logger.handlers if isinstance(h, (logging.FileHandler, logging.handlers.MemoryHandler))]:
        logger.removeHandler(handler)
        handler.close()


def dry_run(cfg: Config) -> str:
    """What ``train`` would do, as YAML: the run folder and the data on top as comments, then the resolved config
    with only the keys the chosen architecture reads (``mednist-gan train --dry-run``)."""
    import dataclasses

    from .. import checkpoint as ckpt
    from ..data import describe_data

    run = cfg.run_path
    found = ckpt.complete_checkpoints(run)
    plan = f"resumes {run} from {found[-1].name}" if found else f"trains a new run in {run}"
    data = describe_data(cfg.data, cfg.model.image_shape)
    resolved = dataclasses.replace(cfg, run_dir=str(run))
    return f"# dry run, nothing written: {plan}\n# {data}\n{resolved.to_yaml(only_read=True)}"
