"""Checkpoints of the full training state: atomic publish, a ``latest`` pointer, rotation, safe loading.

A checkpoint is written under a temporary name and renamed into place only when complete; the
``latest`` pointer is replaced after that. A process killed at any moment therefore leaves either the
previous checkpoint or the new one as the newest complete checkpoint, never a half-written one.
Saving and loading of the tensors themselves goes through the caller's ``save_fn``/``load_fn``
(Accelerate's ``save_state``/``load_state`` in training), so this module knows nothing of processes.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Optional

from .errors import CheckpointError, first_line

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

EMA_FILE = "ema.safetensors"  # the generator's moving-average weights (train.ema_decay), beside Accelerate's files


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, metadata present), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def find_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint the ``latest`` pointer names, or the newest complete one if the pointer is stale."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _STEP_DIR.match(candidate.name) and (candidate / META).is_file():
            return candidate
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def resolve(path: Path) -> Path:
    """A checkpoint folder as given, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if not (path / META).is_file() and checkpoints_dir(path).is_dir():
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"{path}: a run directory without a complete checkpoint")
        return latest
    return path


def read_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {META})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({exc})") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary file, fsync, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())


def temporary_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-{step_dir_name(step)}"


def begin_save(run_dir: Path, step: int) -> Path:
    """Main process: prepare an empty temporary folder for the checkpoint of ``step``."""
    checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(run_dir: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Main process: write metadata, make the checkpoint visible, move ``latest``, then rotate old ones."""
    write_text_atomic(tmp / META, json.dumps(meta, indent=2))
    _fsync_tree(tmp)
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
    write_text_atomic(tmp.parent / LATEST, final.name + "\n")
    for old in complete_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> None:
    """Main process: remove temporary folders left by a save that was killed."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for child in root.glob(".tmp-*"):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def verify_safe(checkpoint: Path) -> None:
    """Open every pickle-based file of a checkpoint with ``weights_only`` loading before anything uses it.

    A file carrying pickled code (or anything but tensors and plain data) is refused here, so it is
    never executed by a later, less careful loader.
    """
    from accelerate.utils import load as accelerate_load  # torch.load(weights_only=True) + numpy RNG arrays

    for path in sorted(Path(checkpoint).iterdir()):
        if path.suffix not in (".bin", ".pkl", ".pt", ".pth"):
            continue
        try:
            accelerate_load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused, the file holds pickled objects other than tensors "
                f"(weights_only loading: {first_line(exc, 120)})"
            ) from None
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable checkpoint file ({type(exc).__name__}: {first_line(exc, 120)})") from None
