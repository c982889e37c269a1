"""Files: the run directory's names, and the one way the toolkit writes a file that others read back.

Writes are atomic (a temporary file beside the target, fsync, rename), so a reader, a killed process or
a full disk leaves either the old file or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable, Union

from .errors import OutputError, output_error

# What a run directory holds (README "What a run leaves on disk").
LOCK_FILE = ".lock"  # "<pid> <host>" of the training process that holds its flock: one run per folder
CONFIG_FILE = "config.yaml"  # the resolved config, written before training starts
GIT_REVISION_FILE = "git_revision.txt"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (and per evaluation)
SAMPLES_DIR = "samples"  # step_*.png sample grids
LOSS_CURVES_FILE = "loss_curves.png"
TRACKER_DIR = "tracker"  # W&B / TensorBoard / ... files, unless log.dir says otherwise
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
WANDB_STEP_FILE = "wandb_step.txt"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
PROVENANCE_FILE = "export.json"  # beside every export (export/, best/): config, step, file hashes
BEST_DIR = "best"  # the generator with the lowest FMD so far (eval.keep_best)


def write_atomic(path: Path, data: Union[str, bytes, Callable[[Path], None]]) -> None:
    """Write ``data`` (text, bytes, or a function that writes the file it is given) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_writable_folder(folder: Path, what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there; else one line naming ``what`` and the path.

    Commands call this before long work whose result goes there, so a bad destination fails at once.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise output_error(what, folder, exc) from None
    return folder


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _left_by_a_dead_process(tag: str) -> bool:
    """Whether ``host-pid`` names a process of this host that is gone (or this very process, which has not
    started writing yet). A process on another host cannot be checked: its leftovers are left alone."""
    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def staging_folder(target: Path) -> Path:
    """An empty folder beside ``target`` to write its new contents into before ``replace_folder``."""
    staging = target.with_name(f".{target.name}.tmp-{_owner_tag()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in ``target``'s place.

    The old ``target`` is renamed aside, the new one renamed in, then the old one removed: a process killed
    between any two of these steps leaves either folder under a name that ``recover_folder`` puts right.
    """
    if target.exists():
        old = target.with_name(f".{target.name}.old-{_owner_tag()}")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    else:
        os.rename(staging, target)


def recover_folder(target: Path) -> None:
    """Put right what a killed ``replace_folder`` left beside ``target``: the old folder back in place if the new
    one never arrived, else removed; a half-written staging folder removed. Folders of live processes are kept."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(.+)$")
    try:
        siblings = sorted(target.parent.iterdir()) if target.parent.is_dir() else []
    except OSError:
        return
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match or not _left_by_a_dead_process(match.group(2)):
            continue
        if match.group(1) == "old" and not target.exists():
            os.rename(sibling, target)
        else:
            shutil.rmtree(sibling, ignore_errors=True)


def check_replaceable(target: Path, what: str, own_names: Iterable[str], kind: str) -> None:
    """A command replaces ``target`` only if it is missing, empty, or holds nothing but names of its own output:
    anything else is a one-line error naming the first foreign entry, before any work."""
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{what} {target}: exists and is not a folder")
    own = set(own_names)
    foreign = sorted(p.name for p in target.iterdir() if p.name not in own)
    if foreign:
        raise OutputError(f"{what} {target}: exists and is not an earlier {kind} (it holds {foreign[0]!r}); "
                          f"choose a new or empty folder, nothing was written")


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk (before a rename publishes the folder)."""
    for child in Path(path).rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
