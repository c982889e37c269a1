"""The sweep's journal file (Optuna's storage that needs no server): every line must be one complete record.

A cut last line (a writer killed mid-write, a full disk) is moved aside to ``optuna.journal.damaged-<time>``
before anything is appended, with a warning; any other line that is not a record stops workers and
``sweep-report`` in one line naming it, the journal unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

from ..config import ConfigWarning
from ..errors import ConfigError, MednistGanError, TrainingError
from ..training.stopping import write_failure
from .locks import holding, shared_file_lock


class JournalError(MednistGanError):
    """A line of the sweep's journal is not a record (nothing is changed)."""


def _write_error(path: Path, exc: OSError) -> TrainingError:
    return TrainingError(f"sweep journal {path}: cannot be written ({write_failure(exc, path.parent)}); its complete "
                         "records are intact: start the worker again once it can be written")


def _bad_line(data: bytes) -> Optional[tuple[int, Optional[str]]]:
    """The first line of a journal that is not a record, and why (None: the last line, cut short); None if all are."""
    *lines, rest = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            return number, "not UTF-8 text"
        except json.JSONDecodeError as exc:
            return number, f"not JSON: {exc.msg}: column {exc.colno}"
        if not isinstance(record, dict) or "op_code" not in record:
            return number, "JSON, but not an Optuna operation"
    return (len(lines) + 1, None) if rest else None


def check_journal(path: Path, repair: bool) -> None:
    """Every line of a journal must be a complete JSON record, ending in a newline.

    A cut last line (a writer killed mid-write, a full disk) is not one: a worker (``repair``) moves it aside, under
    the journal's lock; a reader reads the records before it. Any other line that is not a record is an error.
    """
    try:
        bad = _bad_line(path.read_bytes()) if path.is_file() else None
    except OSError as exc:
        raise ConfigError(f"sweep journal {path}: cannot be read ({exc.strerror or exc})") from None
    if bad is None:
        return
    number, why = bad
    if why is not None:
        raise JournalError(f"sweep journal {path} line {number}: not a journal record ({why}); nothing was changed: "
                           "restore the journal from a copy, or mend or remove that line by hand")
    if not repair:
        warnings.warn(f"sweep journal {path}: line {number} is incomplete (a write in progress, or a writer killed "
                      f"mid-write): reading the {number - 1} complete records before it", ConfigWarning)
        return
    try:
        with holding(shared_file_lock(path)):
            _move_cut_line_aside(path)
    except OSError as exc:
        raise _write_error(path, exc) from None


def _move_cut_line_aside(path: Path) -> None:
    """With the journal's lock held: a last line without its newline goes to a file beside the journal."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0 or os.pread(f.fileno(), 1, size - 1) == b"\n":
            return
        f.seek(0)
        data = f.read()
    start = data.rfind(b"\n") + 1
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        saved = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            with open(saved, "xb") as f:
                f.write(data[start:])
                f.flush()
                os.fsync(f.fileno())
            break
        except FileExistsError:
            continue
        except OSError:
            saved.unlink(missing_ok=True)
            raise
    with open(path, "rb+") as f:
        f.truncate(start)
        os.fsync(f.fileno())
    line = data.count(b"\n") + 1
    warnings.warn(f"sweep journal {path}: line {line} was cut short (a writer killed mid-write, or a full disk): "
                  f"moved it to {saved.name}; the {line - 1} records before it are intact", ConfigWarning)


class CheckedJournal:
    """Optuna's journal file backend, but no record is ever appended to a cut last line, and a failed write (a full
    disk) is one line naming the journal."""

    def __init__(self, path: Path):
        from optuna.storages.journal import JournalFileBackend

        self.path, self.lock = path, shared_file_lock(path)
        self.backend = JournalFileBackend(str(path), lock_obj=self.lock)

    def read_logs(self, log_number_from: int) -> Iterator[dict]:
        try:
            yield from self.backend.read_logs(log_number_from)
        except ValueError:  # a line that is not a record, followed by others
            check_journal(self.path, repair=False)  # names it
            raise

    def append_logs(self, logs: list[dict]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        try:
            with holding(self.lock):
                _move_cut_line_aside(self.path)
                with open(self.path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise _write_error(self.path, exc) from None
