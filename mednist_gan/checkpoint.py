"""Checkpoints of the full training state: atomic publish, a ``latest`` pointer, rotation, safe loading.

A checkpoint is written under a temporary name and renamed into place only when complete; the
``latest`` pointer is replaced after that. A process killed at any moment therefore leaves either the
previous checkpoint or the new one as the newest complete checkpoint, never a half-written one.
Saving and loading of the tensors themselves goes through the caller's ``save_fn``/``load_fn``
(Accelerate's ``save_state``/``load_state`` in training), so this module knows nothing of processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from packaging.version import InvalidVersion, Version

from . import __version__
from .config import LEGACY_KEYS, Config
from .errors import CheckpointError, first_line
from .files import CHECKPOINTS_DIR, fsync_tree, sha256_file, write_atomic

log = logging.getLogger("mednist_gan")

LATEST = "latest"
META = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

G_FILE, D_FILE = "model.safetensors", "model_1.safetensors"  # Accelerate saves prepared models in order: G, D
EMA_FILE = "ema.safetensors"  # the generator's moving-average weights (train.ema_decay), beside Accelerate's files
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint moved aside for a person to inspect (never deleted)
META_KEYS = ("state", "config", "num_processes", "git_revision", "version", "files")  # what checkpoint.json holds


@dataclass
class TrainState:
    """Counters saved with every checkpoint (plain JSON, so loading it can never run code)."""

    step: int = 0  # iterations completed
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed


# Beside the counters in a checkpoint of a train.d_augment=ada run (only there: other runs' checkpoints stay as
# earlier versions read them): ADA's probability, and the sum and number of D's mean signs on real images since
# its last adjustment (training/d_augment.py).
ADA_STATE_KEYS = ("augment_p", "ada_signs", "ada_count")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


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
    try:
        candidate = root / pointer.read_text().strip()
        if _STEP_DIR.match(candidate.name) and (candidate / META).is_file():
            return candidate
    except (OSError, ValueError):  # missing, unreadable or garbage: the newest complete checkpoint decides
        pass
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def newest_intact(run_dir: Path, attempts: int = 5) -> tuple[Optional[Path], list[tuple[Path, CheckpointError]]]:
    """The newest checkpoint that passes ``verify``, and the newer ones that failed it (newest first).

    A checkpoint that a running training rotated away while it was read is not damaged: the checkpoints are
    listed again (``attempts`` times at most) and the new newest one is read.
    """
    intact, _, damaged = _newest_intact(run_dir, attempts)
    return intact, damaged


def _newest_intact(run_dir: Path, attempts: int
                   ) -> tuple[Optional[Path], Optional[dict], list[tuple[Path, CheckpointError]]]:
    """``newest_intact``, with the metadata ``verify`` returned for the intact checkpoint."""
    listed = complete_checkpoints(run_dir)
    candidates = listed[::-1]
    latest = find_latest(run_dir)
    if latest in candidates:  # the pointer wins over names (they agree unless a save was interrupted)
        candidates.remove(latest)
        candidates.insert(0, latest)
    damaged = []
    for candidate in candidates:
        try:
            return candidate, verify(candidate), damaged
        except CheckpointError as exc:
            if attempts > 1 and (not candidate.is_dir() or complete_checkpoints(run_dir) != listed):
                return _newest_intact(run_dir, attempts - 1)
            damaged.append((candidate, exc))
    return None, None, damaged


def no_intact_error(run_dir: Path, damaged: list[tuple[Path, CheckpointError]]) -> CheckpointError:
    return CheckpointError(f"{run_dir}: no intact checkpoint ({len(damaged)} damaged, newest: {damaged[0][1]}); "
                           "restore it from a copy, or move the damaged checkpoints away to start afresh")


def set_aside(checkpoint: Path) -> Path:
    """Main process: rename a damaged checkpoint to ``damaged-step_N`` (never resumed from, never deleted)."""
    target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}")
    os.rename(checkpoint, target)
    return target


def resolve(path: Path) -> Path:
    """A checkpoint folder as given, or a run directory's newest intact checkpoint; verified either way.

    Read-only: damaged checkpoints of a run directory are skipped (with a warning), not moved.
    """
    return resolve_with_meta(path)[0]


def resolve_with_meta(path: Path) -> tuple[Path, dict]:
    """``resolve``, and the checkpoint's metadata as ``verify`` read it: each file is checked once, here."""
    path = Path(path)
    if not (path / META).is_file() and checkpoints_dir(path).is_dir():
        intact, meta, damaged = _newest_intact(path, attempts=5)
        if intact is None:
            if damaged:
                raise no_intact_error(path, damaged)
            raise CheckpointError(f"{path}: a run directory without a complete checkpoint")
        for bad, reason in damaged:
            log.warning("skipping damaged checkpoint %s (%s); using %s", bad, reason, intact)
        return intact, meta
    return path, verify(path)


def read_meta(checkpoint: Path) -> dict:
    path = Path(checkpoint) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no {META})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({first_line(exc, 120)})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("state"), dict) and isinstance(meta.get("config"), dict)):
        raise CheckpointError(f"{path}: unreadable checkpoint metadata (no state and config)")
    unknown = _drop_unknown_keys(meta)
    newer = _newer_version(meta.get("version"))
    notes = [f"written by mednist-gan {newer}, newer than this one ({__version__})"] if newer else []
    if unknown:
        notes.append("ignoring keys this version does not know: " + ", ".join(unknown))
    if notes and (message := f"{path}: {'; '.join(notes)}") not in _reported:
        _reported.add(message)
        log.warning("%s", message + ("; upgrade mednist-gan to use everything it recorded" if newer else ""))
    return meta


_reported: set[str] = set()  # warnings about checkpoint metadata already given by this process (once per file)


def _drop_unknown_keys(meta: dict) -> list[str]:
    """Remove the keys of a checkpoint's metadata that this version does not know (a newer version may write
    more); returns their dotted names. Keys of older versions that moved (``LEGACY_KEYS``) are kept."""
    def drop(record: dict, known, prefix: str) -> list[str]:
        unknown = [key for key in record if key not in known]
        for key in unknown:
            del record[key]
        return [prefix + key for key in unknown]

    defaults = Config()
    names = drop(meta, META_KEYS, "")
    names += drop(meta["state"], [f.name for f in dataclasses.fields(TrainState)] + list(ADA_STATE_KEYS), "state.")
    names += drop(meta["config"], [f.name for f in dataclasses.fields(Config)], "config.")
    for section, record in meta["config"].items():
        default = getattr(defaults, section)
        if dataclasses.is_dataclass(default) and isinstance(record, dict):
            known = [f.name for f in dataclasses.fields(default)]
            known += [key.split(".")[1] for key in LEGACY_KEYS if key.startswith(section + ".")]
            names += drop(record, known, f"config.{section}.")
    return names


def _newer_version(recorded) -> Optional[str]:
    """The version that wrote a checkpoint when it is newer than this one (None: not newer, or not recorded)."""
    try:
        return str(recorded) if Version(str(recorded)) > Version(__version__) else None
    except InvalidVersion:
        return None


def verify_recorded_sha256(path: Path, expected: Optional[str], record: Path) -> None:
    """A file against the sha256 that ``record`` (an export.json or model card) lists for it."""
    if expected is not None and sha256_file(path) != expected:
        raise CheckpointError(f"{path}: damaged or replaced (its sha256 differs from the one in {record}); "
                              "re-export it, or reinstall the package for a shipped file")


def file_records(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder`` (relative POSIX paths), as a checkpoint records them."""
    return {child.relative_to(folder).as_posix(): {"size": child.stat().st_size, "sha256": sha256_file(child)}
            for child in sorted(folder.rglob("*")) if child.is_file() and child.name != META}


def verify(checkpoint: Path) -> dict:
    """Check that a checkpoint is as it was written; returns its metadata, or raises naming the damaged file.

    Checkpoints record each file's size and sha256 in their metadata when published. Those written
    before that are checked by loading every file instead (safetensors headers and tensors, and
    pickles with ``weights_only``).
    """
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    records = meta.get("files")
    if records is None:
        _load_every_file(checkpoint)
        return meta
    for name, record in records.items():
        path = checkpoint / name
        try:
            size = path.stat().st_size
        except OSError:
            raise CheckpointError(f"{path}: missing from the checkpoint") from None
        if size != record["size"]:
            raise CheckpointError(f"{path}: {size} bytes, {record['size']} when written (cut short or overwritten)")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({first_line(exc, 120)})") from None
        if digest != record["sha256"]:
            raise CheckpointError(f"{path}: content changed since it was written (sha256 differs)")
    return meta


def _load_every_file(checkpoint: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            try:
                load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: unreadable checkpoint file ({first_line(exc, 120)})") from None
    verify_safe(checkpoint)


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
    """Main process: record every file's size and checksum in the metadata, write it, make the checkpoint
    visible, move ``latest``, then rotate old ones."""
    fsync_tree(tmp)
    write_atomic(tmp / META, json.dumps({**meta, "version": __version__, "files": file_records(tmp)}, indent=2))
    final = tmp.parent / step_dir_name(step)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
    write_atomic(tmp.parent / LATEST, final.name + "\n")
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
            raise CheckpointError(f"{path}: unreadable checkpoint file "
                                  f"({type(exc).__name__}: {first_line(exc, 120)})") from None
