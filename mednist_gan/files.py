"""Files: the run directory's names, and the one way the toolkit writes a file that others read back.

Writes are atomic (a temporary file beside the target, fsync, rename), so a reader, a killed process or
a full disk leaves either the old file or the whole new one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Union

from .errors import output_error

# What a run directory holds (README "What a run leaves on disk").
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
