"""Hyper-parameter sweeps with Optuna: the search-space file, the study, the worker, and one trial as a training run.

    mednist-gan sweep configs/sweeps/quality.yaml data.root=/data/MedNIST       # one worker, one trial at a time
    mednist-gan sweep configs/sweeps/quality.yaml --parallel 4                   # four trials side by side
    sbatch --array=0-15 slurm/sweep.sbatch configs/sweeps/quality.yaml data.root=/data/MedNIST   # 16 workers

A worker (``run_worker``) claims trials from the study, kept in Optuna's storage (by default a journal file
in the sweep's folder that workers on several nodes share; or a database URL), and runs each trial in a
process of its own (``run_trial``): an ordinary training run in ``<sweep_dir>/trials/trial_N`` whose
in-training evaluations go to Optuna's pruner through the trainer's evaluation callback. A trial stopped by a
signal stays claimed by its worker, which resumes it from its checkpoint when it starts again (a requeued
SLURM job); a trial whose worker is gone for good is taken over by another worker once no new trials are
left. Live workers and trials hold locks in ``<sweep_dir>/locks`` (fcntl, which shared file systems with
locking honour across nodes); that is how a worker tells a stopped trial from a running one.

Every line of a journal must be one complete record: a cut last line (a writer killed mid-write, a full disk) is
moved aside to ``optuna.journal.damaged-<time>`` before anything is appended, with a warning; any other line
that is not a record stops workers and ``sweep-report`` in one line naming it, the journal unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import fcntl
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import typing
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from ..config import Config, ConfigWarning, load_config, read_yaml
from ..errors import ConfigError, MednistGanError, TrainingError, first_line
from ..files import ensure_writable_folder, write_atomic
from ..training.stopping import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, CatchStopSignals, write_failure

SPEC_KEYS = ("name", "base", "overrides", "sweep_dir", "storage", "trials", "budget", "objective", "sampler",
             "pruner", "enqueue", "params")
SAMPLER_OPTIONS = {"tpe": ("seed", "startup_trials"), "random": ("seed",), "grid": ("seed",)}
PRUNER_OPTIONS = {"median": ("startup_trials", "warmup_steps"),
                  "successive_halving": ("min_resource", "reduction_factor"), "none": ()}
# Keys each trial's config gets from the sweep; a search space may not set them.
SWEEP_OWNED_KEYS = ("name", "run_dir", "train.resume", "log.group")
RECORD_ATTR = "mednist_gan_sweep"  # the search space, as the study's first worker recorded it
JOURNAL_FILE = "optuna.journal"
TRIALS_DIR = "trials"
LOCKS_DIR = "locks"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ----------------------------------------------------------------------------- the search-space file

@dataclass(frozen=True)
class Param:
    """One searched config key: a list of choices, or a range (log-scaled, or in steps)."""

    key: str
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    integer: bool = False

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.choices is not None:
            return CategoricalDistribution(self.choices)
        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        scale = ", log scale" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{'integer' if self.integer else 'number'} in [{self.low:g}, {self.high:g}]{scale}"

    def record(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SweepSpec:
    """A search space, validated: every trial's config loads, whatever values the sampler picks."""

    file: Path
    name: str
    base: Path
    overrides: tuple[str, ...]  # the file's, then the command line's: fixed for every trial
    cli_overrides: tuple[str, ...]  # the command line's alone, which a worker passes on to its trials
    sweep_dir: Path
    storage: str  # a database URL, or the path of a journal file
    trials: int
    max_steps: Optional[int]
    eval_every_steps: Optional[int]
    metric: str
    direction: str
    sampler: dict
    pruner: dict
    enqueue: tuple[dict, ...]
    params: tuple[Param, ...]

    @property
    def distributions(self) -> dict:
        return {p.key: p.distribution() for p in self.params}

    def trial_dir(self, number: int) -> Path:
        return self.sweep_dir / TRIALS_DIR / f"trial_{number:04d}"

    def trial_config(self, number: int, params: dict) -> Config:
        """Trial ``number``'s config: base file, fixed overrides, budget, its parameters, its run directory."""
        values: dict[str, Any] = {}
        if self.max_steps is not None:
            values["train.max_steps"] = self.max_steps
        if self.eval_every_steps is not None:
            values["eval.every_steps"] = self.eval_every_steps
        values.update(params)
        values.update({"name": f"{self.name}-trial_{number:04d}", "run_dir": str(self.trial_dir(number)),
                       "train.resume": "auto", "log.group": self.name})
        return load_config(self.base, list(self.overrides), values)

    def record(self) -> dict:
        """What every worker of one sweep must agree on (the number of trials may grow; paths may be spelled otherwise)."""
        return {"base": str(self.base.resolve()), "overrides": list(self.overrides),
                "budget": {"max_steps": self.max_steps, "eval_every_steps": self.eval_every_steps},
                "objective": {"metric": self.metric, "direction": self.direction}, "sampler": self.sampler,
                "pruner": self.pruner, "enqueue": [dict(e) for e in self.enqueue],
                "params": {p.key: p.record() for p in self.params}}


class _Spec:
    """Reading one search-space file: each check names the file and the key."""

    def __init__(self, file: Path):
        self.file = file

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"sweep file {self.file}: {where}: {message}" if where else f"sweep file {self.file}: {message}")

    def expect(self, ok: bool, where: str, value: Any, expected: str) -> None:
        if not ok:
            raise self.error("", f"{where}={value!r} is not allowed: expected {expected}")

    def mapping(self, value: Any, where: str, allowed: Sequence[str]) -> dict:
        """A mapping whose keys are all ``allowed``; ``where`` is its dotted place ("" for the top level)."""
        if not isinstance(value, dict):
            if not where:
                raise self.error("", "expected a mapping of keys at the top level")
            self.expect(False, where, value, f"a mapping with keys {', '.join(allowed)}")
        prefix = f"{where}." if where else ""
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.error("", f"unknown key '{prefix}{key}': {hint}")
        return value

    def integer(self, value: Any, where: str, minimum: int) -> int:
        self.expect(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, where, value,
                    f"an integer >= {minimum}")
        return value

    def kind(self, value: Any, where: str, options: dict, default: str) -> dict:
        """``kind`` or ``{kind: ..., option: ...}`` (sampler, pruner), checked against each kind's options."""
        value = default if value is None else value
        if isinstance(value, str):
            value = {"kind": value}
        self.expect(isinstance(value, dict) and value.get("kind") in options, f"{where}.kind",
                    value.get("kind") if isinstance(value, dict) else value, f"one of {', '.join(options)}")
        return dict(self.mapping(value, where, ("kind", *options[value["kind"]])))


def load_sweep(path: Path, overrides: Sequence[str] = (), sweep_dir: Optional[Path] = None) -> SweepSpec:
    """Read and check a search-space file; ``overrides`` (``key=value``) apply to every trial's config."""
    path = Path(path)
    spec = _Spec(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    data = read_yaml(path, "sweep file")
    spec.mapping(data, "", SPEC_KEYS)

    name = data.get("name", path.stem)
    spec.expect(isinstance(name, str) and _NAME.fullmatch(name) is not None, "name", name,
                "letters, digits, '_', '.' or '-' (it names the study, a folder and the W&B group)")
    spec.expect(isinstance(data.get("base"), str), "base", data.get("base"), "the training config every trial "
                "starts from, relative to this file (e.g. ../quality.yaml)")
    base = path.parent / data["base"]
    file_overrides = data.get("overrides") or []
    spec.expect(isinstance(file_overrides, list) and all(isinstance(o, str) for o in file_overrides), "overrides",
                file_overrides, "a list of key=value strings")
    all_overrides = tuple(file_overrides) + tuple(overrides)
    for arg in all_overrides:
        key = arg.partition("=")[0]
        if key in SWEEP_OWNED_KEYS:
            raise spec.error("overrides", f"{key} is set by the sweep for each trial (its run directory is "
                             f"<sweep_dir>/{TRIALS_DIR}/trial_N)")

    trials = data.get("trials")
    budget = spec.mapping(data.get("budget") or {}, "budget", ("max_steps", "eval_every_steps"))
    max_steps = budget.get("max_steps")
    eval_every = budget.get("eval_every_steps")
    if max_steps is not None:
        spec.integer(max_steps, "budget.max_steps", 1)
    if eval_every is not None:
        spec.integer(eval_every, "budget.eval_every_steps", 1)

    objective = data.get("objective") or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    spec.mapping(objective, "objective", ("metric", "direction"))
    metric = objective.get("metric", "eval/fd_ssl")
    direction = objective.get("direction", "minimize")
    spec.expect(isinstance(metric, str) and bool(metric), "objective.metric", metric,
                "a key of the in-training evaluation's results, e.g. eval/fd_ssl")
    spec.expect(direction in ("minimize", "maximize"), "objective.direction", direction, "minimize or maximize")

    sampler = spec.kind(data.get("sampler"), "sampler", SAMPLER_OPTIONS, "tpe")
    for key in ("seed", "startup_trials"):
        if key in sampler:
            spec.integer(sampler[key], f"sampler.{key}", 0)
    pruner = spec.kind(data.get("pruner"), "pruner", PRUNER_OPTIONS, "median")
    for key, minimum in (("startup_trials", 0), ("warmup_steps", 0), ("reduction_factor", 2)):
        if key in pruner:
            spec.integer(pruner[key], f"pruner.{key}", minimum)
    if pruner.get("min_resource", "auto") != "auto":
        spec.integer(pruner["min_resource"], "pruner.min_resource", 1)

    # The fixed part of every trial's config must load before any parameter is looked at.
    fixed = {k: v for k, v in (("train.max_steps", max_steps), ("eval.every_steps", eval_every)) if v is not None}
    try:
        base_cfg = load_config(base, list(all_overrides), fixed)
    except ConfigError as exc:
        raise spec.error("base and overrides", str(exc)) from None
    if base_cfg.eval.every_steps is None and base_cfg.eval.every_epochs is None:
        raise spec.error("budget", "the trials never evaluate, so nothing is reported to the pruner before the end: "
                         "set budget.eval_every_steps")

    raw_params = data.get("params")
    spec.expect(isinstance(raw_params, dict) and bool(raw_params), "params", raw_params,
                "a mapping of config keys to {choices: [...]} or {low: ..., high: ...}")
    params = tuple(_param(spec, str(key), value, base, all_overrides) for key, value in raw_params.items())

    if sampler["kind"] == "grid":
        ranged = [p.key for p in params if p.choices is None]
        if ranged:
            raise spec.error(f"params.{ranged[0]}", "the grid sampler needs choices for every parameter")
        size = math.prod(len(p.choices) for p in params)
        trials = size if trials is None else trials
        spec.expect(isinstance(trials, int) and 1 <= trials <= size, "trials", trials,
                    f"an integer from 1 to the grid's {size} points")
    spec.integer(trials, "trials", 1)

    enqueue = data.get("enqueue") or []
    spec.expect(isinstance(enqueue, list), "enqueue", enqueue, "a list of {parameter: value} mappings")
    by_key = {p.key: p for p in params}
    for i, entry in enumerate(enqueue):
        spec.mapping(entry, f"enqueue[{i}]", tuple(by_key))
        for key, value in entry.items():
            spec.expect(by_key[key].contains(value), f"enqueue[{i}].{key}", value, by_key[key].describe())
    spec.expect(len(enqueue) <= trials, "enqueue", f"{len(enqueue)} trials", f"at most trials={trials}")

    root = Path(sweep_dir) if sweep_dir is not None else Path(data.get("sweep_dir") or Path("sweeps") / name)
    storage = data.get("storage") or str(root / JOURNAL_FILE)
    spec.expect(isinstance(storage, str), "storage", storage,
                "a journal file's path, or a database URL such as sqlite:///sweep.db")
    return SweepSpec(file=path, name=name, base=base, overrides=all_overrides, cli_overrides=tuple(overrides),
                     sweep_dir=root, storage=storage, trials=trials, max_steps=max_steps, eval_every_steps=eval_every,
                     metric=metric, direction=direction, sampler=sampler, pruner=pruner,
                     enqueue=tuple(enqueue), params=params)


def _param(spec: _Spec, key: str, value: Any, base: Path, overrides: Sequence[str]) -> Param:
    where = f"params.{key}"
    if key in SWEEP_OWNED_KEYS:
        raise spec.error(where, f"{key} is set by the sweep for each trial")
    tp = _key_type(spec, key, base, overrides)
    if not isinstance(value, dict):
        raise spec.error(where, f"expected {{choices: [...]}} or {{low: ..., high: ...}}, got {value!r}")
    spec.mapping(value, where, ("choices", "low", "high", "log", "step"))

    def check(v: Any, what: str) -> None:  # the value as a trial's config would hold it
        try:
            load_config(base, list(overrides), {key: v})
        except ConfigError as exc:
            raise spec.error(what, str(exc)) from None

    if "choices" in value:
        if set(value) != {"choices"}:
            raise spec.error(where, "choices cannot be combined with low/high/log/step")
        choices = value["choices"]
        spec.expect(isinstance(choices, list) and bool(choices), f"{where}.choices", choices, "a non-empty list")
        for v in choices:
            spec.expect(v is None or isinstance(v, (bool, int, float, str)), f"{where}.choices", v,
                        "numbers, strings, booleans or null")
            check(v, f"{where}.choices")
        spec.expect(len(set(map(repr, choices))) == len(choices), f"{where}.choices", choices, "no value twice")
        return Param(key, choices=tuple(choices))

    missing = [b for b in ("low", "high") if b not in value]
    if missing:
        raise spec.error(where, f"a range needs low and high (missing {' and '.join(missing)}); or give choices")
    numeric = _numeric(tp)
    if numeric is None:
        raise spec.error(where, f"{key} is not a number, so it has no range: give choices")
    low, high = value["low"], value["high"]
    log, step = value.get("log", False), value.get("step")
    for bound, v in (("low", low), ("high", high)):
        ok = isinstance(v, int) if numeric is int else isinstance(v, (int, float))
        spec.expect(ok and not isinstance(v, bool), f"{where}.{bound}", v,
                    "an integer" if numeric is int else "a number")
    if not low < high:
        raise spec.error(where, f"empty range: low={low!r} must be below high={high!r}")
    spec.expect(isinstance(log, bool), f"{where}.log", log, "true or false")
    if log:
        spec.expect(low > 0, f"{where}.low", low, "a number > 0 with log: true")
    if step is not None:
        ok = isinstance(step, int) if numeric is int else isinstance(step, (int, float))
        spec.expect(ok and not isinstance(step, bool) and step > 0 and not log, f"{where}.step", step,
                    ("an integer" if numeric is int else "a number") + " > 0, without log: true")
    check(low, f"{where}.low")
    check(high, f"{where}.high")
    if numeric is int:
        return Param(key, low=low, high=high, log=log, step=step, integer=True)
    return Param(key, low=float(low), high=float(high), log=log, step=None if step is None else float(step))


def _key_type(spec: _Spec, key: str, base: Path, overrides: Sequence[str]) -> Any:
    """The annotation of a dotted config key; an unknown key is the config's own one-line error."""
    tp: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            try:
                load_config(base, list(overrides), {key: None})
            except ConfigError as exc:
                raise spec.error(f"params.{key}", str(exc)) from None
            raise spec.error(f"params.{key}", "not a config key")
        tp = hints[part]
    if dataclasses.is_dataclass(tp):
        raise spec.error(f"params.{key}", f"{key} is a section, not a key")
    return tp


def _numeric(tp: Any) -> Optional[type]:
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp if tp in (int, float) else None


# ----------------------------------------------------------------------------- the journal file

class JournalError(MednistGanError):
    """A line of the sweep's journal is not a record (nothing is changed)."""


@contextmanager
def _holding(lock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _file_lock(path: Path):
    """``<path>.lock``, created with open(O_EXCL), which works on NFS where workers on several nodes share the file."""
    from optuna.storages.journal import JournalFileOpenLock

    return JournalFileOpenLock(str(path))


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
        with _holding(_file_lock(path)):
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


class _Journal:
    """Optuna's journal file backend, but no record is ever appended to a cut last line, and a failed write (a full
    disk) is one line naming the journal."""

    def __init__(self, path: Path):
        from optuna.storages.journal import JournalFileBackend

        self.path, self.lock = path, _file_lock(path)
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
            with _holding(self.lock):
                _move_cut_line_aside(self.path)
                with open(self.path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            raise _write_error(self.path, exc) from None


# ----------------------------------------------------------------------------- the study

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what happens, in its own lines
    return optuna


def make_storage(url_or_path: str, writer: bool = True):
    """A database URL (``sqlite:///...``, ``postgresql://...``) or a journal file that needs no server.

    A journal is checked first (``check_journal``); a reader (``writer=False``) neither creates nor changes it.
    """
    optuna = _optuna()
    if "://" in url_or_path:
        try:
            return optuna.storages.RDBStorage(url_or_path)
        except Exception as exc:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
            raise ConfigError(f"storage {url_or_path}: cannot be opened ({type(exc).__name__}: "
                              f"{first_line(exc, 160)})") from None
    from optuna.storages.journal import JournalStorage

    path = Path(url_or_path)
    if writer:
        ensure_writable_folder(path.parent, "storage")
    elif not path.is_file():
        raise ConfigError(f"sweep journal {path} does not exist: the sweep has not started (run mednist-gan sweep "
                          "first)")
    check_journal(path, repair=writer)
    return JournalStorage(_Journal(path))


def make_sampler(spec: SweepSpec, salt: str = ""):
    """The sampler of ``spec``; ``salt`` (the worker id) keeps workers of one seed from drawing the same values."""
    optuna = _optuna()
    options = spec.sampler
    seed = options.get("seed")
    if seed is not None and salt:
        seed = (seed + zlib.crc32(salt.encode())) % 2**32
    if options["kind"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if options["kind"] == "grid":
        return optuna.samplers.GridSampler({p.key: list(p.choices) for p in spec.params}, seed=seed)
    # constant_liar: trials still running count as bad ones, so that parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=options.get("startup_trials", 10), constant_liar=True)


def make_pruner(spec: SweepSpec):
    optuna = _optuna()
    options = spec.pruner
    if options["kind"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=options.get("startup_trials", 5),
                                           n_warmup_steps=options.get("warmup_steps", 0))
    if options["kind"] == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=options.get("min_resource", "auto"),
                                                      reduction_factor=options.get("reduction_factor", 4))
    return optuna.pruners.NopPruner()


@contextmanager
def _sweep_lock(spec: SweepSpec) -> Iterator[None]:
    """One worker at a time creates the study and claims trials (a lock file that works on NFS too)."""
    with _holding(_file_lock(spec.sweep_dir / "claim")):
        yield


def open_study(spec: SweepSpec, create: bool, salt: str = ""):
    """The sweep's study: created (with its recorded search space and enqueued trials) by the first worker.

    ``create=False``: an existing study with a sampler that samples nothing, for reporting and telling (the
    grid sampler's ``after_trial`` would stop an ``optimize`` loop that the ask-and-tell interface has not).
    """
    optuna = _optuna()
    ensure_writable_folder(spec.sweep_dir, "sweep_dir")
    storage = make_storage(spec.storage)
    sampler = make_sampler(spec, salt) if create else optuna.samplers.RandomSampler()  # a trial process samples nothing
    with _sweep_lock(spec):
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=make_pruner(spec))
        except KeyError:
            if not create:
                raise ConfigError(f"sweep {spec.name}: no such study in {spec.storage}") from None
            study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler,
                                        pruner=make_pruner(spec), direction=spec.direction)
            study.set_user_attr(RECORD_ATTR, spec.record())
            for params in spec.enqueue:
                study.enqueue_trial(params)
            write_atomic(spec.sweep_dir / "sweep.yaml", yaml.safe_dump({"name": spec.name, **spec.record()},
                                                                        sort_keys=False))
    recorded = study.user_attrs.get(RECORD_ATTR)
    if recorded != spec.record():
        differs = [k for k in spec.record() if (recorded or {}).get(k) != spec.record()[k]]
        raise ConfigError(f"sweep {spec.name} in {spec.storage} was started with another search space "
                          f"({', '.join(differs) or 'no record of it'} differ): restore {spec.file}, or give the "
                          f"new one another name or sweep_dir")
    return study


def frozen_trial(study, number: int):
    """Trial ``number`` as the storage has it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def summary(study) -> str:
    from optuna.trial import TrialState

    counts = {s: 0 for s in ("complete", "pruned", "running", "failed", "waiting")}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
             TrialState.FAIL: "failed", TrialState.WAITING: "waiting"}
    for t in study.get_trials(deepcopy=False):
        counts[names[t.state]] += 1
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


# ----------------------------------------------------------------------------- locks: who is alive

class _Lock:
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


def _held_by_someone(path: Path) -> bool:
    """Whether a live process holds the lock on ``path`` (never call it for a lock this process holds)."""
    if not path.exists():
        return False
    probe = _Lock(path)
    if probe.acquire():
        probe.release()
        return False
    return True


def _worker_lock(spec: SweepSpec, worker: str) -> Path:
    return spec.sweep_dir / LOCKS_DIR / f"worker-{worker}.lock"


def _trial_lock(spec: SweepSpec, number: int) -> Path:
    return spec.sweep_dir / LOCKS_DIR / f"trial_{number:04d}.lock"


def default_worker_id() -> str:
    """The SLURM array task (``<array job>_<task>``, the same after a requeue), the job, or this host."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    return env.get("SLURM_JOB_ID") or socket.gethostname()


# ----------------------------------------------------------------------------- the worker

def _say(spec: SweepSpec, worker: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} sweep {spec.name} worker {worker}: {message}", flush=True)


def _claim(study, spec: SweepSpec, worker: str, busy: set[int]) -> Optional[tuple[int, str]]:
    """The next trial for this worker, and why: its own stopped trial, a new one, or one whose worker is gone."""
    from optuna.trial import Trial, TrialState

    with _sweep_lock(spec):
        trials = study.get_trials(deepcopy=False)
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number not in busy]
        for t in running:
            if t.user_attrs.get("worker") == worker:
                return t.number, "resuming it (this worker was stopped while it ran)"
        if sum(t.state != TrialState.WAITING for t in trials) < spec.trials:
            trial = study.ask(spec.distributions)
            trial.set_user_attr("worker", worker)
            trial.set_user_attr("run_dir", str(spec.trial_dir(trial.number).resolve()))
            return trial.number, "new: " + ", ".join(f"{k}={v!r}" for k, v in trial.params.items())
        for t in running:
            owner = t.user_attrs.get("worker")
            if (owner is None or not _held_by_someone(_worker_lock(spec, owner))) \
                    and not _held_by_someone(_trial_lock(spec, t.number)):
                Trial(study, t._trial_id).set_user_attr("worker", worker)
                return t.number, f"taking it over from worker {owner}, which is gone; resuming from its checkpoint"
    return None


def _fail_trial(study, number: int, reason: str) -> None:
    from optuna.trial import Trial, TrialState

    frozen = frozen_trial(study, number)
    if frozen.state == TrialState.RUNNING:
        Trial(study, frozen._trial_id).set_user_attr("error", reason)
        study.tell(number, state=TrialState.FAIL)


class _Stop(CatchStopSignals):
    """The worker's stop signals: no new trials, and SIGUSR1 (checkpoint and stop) to its trials.

    Trials start with SIGUSR1 ignored, so that one arriving before the trainer listens cannot kill them;
    ``remind`` sends it again every few seconds until they have stopped. SLURM signals every process of the
    job step, a signal sent by hand reaches this process alone; Ctrl-C reaches the whole process group. A
    second Ctrl-C ends at once.
    """

    REMIND_EVERY_S = 2.0

    def __init__(self, children: dict):
        self.children, self._reminded = children, 0.0

    def _on_signal(self, signum: int) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.remind()

    def remind(self) -> None:
        """SIGUSR1 to the trials still running, now and then after a stop signal."""
        if self.signal_name is None or time.monotonic() - self._reminded < self.REMIND_EVERY_S:
            return
        self._reminded = time.monotonic()
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)


def _ignore_usr1() -> None:
    """In a trial's process before it starts: SIGUSR1 is ignored until the trainer catches it (a signal
    ignored stays ignored across exec, as launch/run.sh relies on too)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run_worker(spec: SweepSpec, parallel: int = 1, worker: Optional[str] = None, debug: bool = False) -> int:
    """Claim and run trials, ``parallel`` at a time, until the sweep has no more for this worker.

    Returns 0 when done, 3 when stopped by a signal (its trials checkpointed: start it again to resume them),
    2 when a trial found bad input (the search space or the data needs fixing), 130 on a second Ctrl-C.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: expected an integer >= 1")
    ensure_writable_folder(spec.sweep_dir, "sweep_dir")
    explicit = worker is not None
    base_id = worker or default_worker_id()
    worker, lock = base_id, None
    for n in range(1, 1000):  # a default id in use on this host: the next free one
        worker = base_id if n == 1 else f"{base_id}-{n}"
        lock = _Lock(_worker_lock(spec, worker))
        if lock.acquire():
            break
        if explicit:
            raise ConfigError(f"worker id {worker} is in use by a live process ({lock.holder()}): give another "
                              "--worker-id")
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:  # trials side by side share this task's cores
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    command = [sys.executable, "-m", "mednist_gan", "sweep", str(spec.file), *spec.cli_overrides,
               "--sweep-dir", str(spec.sweep_dir.resolve())] + (["--debug"] if debug else [])
    _say(spec, worker, f"{spec.trials} trials of {len(spec.params)} parameters, objective {spec.metric} "
                       f"({spec.direction}), storage {spec.storage}; up to {parallel} at a time here")
    children: dict[int, subprocess.Popen] = {}
    no_more: Optional[str] = None  # why this worker starts no more trials
    preempted = bad_input = False
    try:
        study = open_study(spec, create=True, salt=worker)  # claims trials
        teller = open_study(spec, create=False)  # tells Optuna of trials whose process died
        with _Stop(children) as stop:
            while True:
                while stop.signal_name is None and no_more is None and len(children) < parallel:
                    claimed = _claim(study, spec, worker, set(children))
                    if claimed is None:
                        break
                    number, why = claimed
                    _say(spec, worker, f"trial {number}: {why}")
                    children[number] = subprocess.Popen(command + ["--trial", str(number)], env=env,
                                                        preexec_fn=_ignore_usr1)
                if not children:
                    break
                time.sleep(0.5)
                stop.remind()
                for number, proc in list(children.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del children[number]
                    outcome = _after_trial(teller, spec, number, code, stopping=stop.signal_name is not None)
                    _say(spec, worker, f"trial {number}: {outcome}")
                    if code == PREEMPTED_EXIT_CODE:
                        preempted, no_more = True, no_more or "a trial was stopped by a signal"
                    elif code == 2:
                        bad_input, no_more = True, "a trial found bad input"
            preempted = preempted or stop.signal_name is not None
    except KeyboardInterrupt:
        for proc in children.values():
            proc.wait()
        _say(spec, worker, "interrupted; its trials resume when this worker starts again")
        return INTERRUPTED_EXIT_CODE
    finally:
        lock.release()
    status = 2 if bad_input else PREEMPTED_EXIT_CODE if preempted else 0
    if status == PREEMPTED_EXIT_CODE:
        _say(spec, worker, "stopped; its trials checkpointed and resume when this worker starts again "
                           "(another worker takes them over once no new trials are left)")
    elif status == 2:
        _say(spec, worker, f"stopped: {no_more}")
    else:
        _say(spec, worker, f"no trials left for this worker; the sweep has {summary(study)} "
                           f"(mednist-gan sweep-report {spec.file})")
    return status


def _after_trial(study, spec: SweepSpec, number: int, code: int, stopping: bool) -> str:
    """What became of a trial whose process ended; one that died without saying so fails, unless this worker
    is stopping too (the same signal ended it; it resumes from its newest checkpoint)."""
    from optuna.trial import TrialState

    frozen = frozen_trial(study, number)
    if frozen.state == TrialState.COMPLETE:
        return f"complete, {spec.metric} {frozen.value:.6g}"
    if frozen.state == TrialState.PRUNED:
        return f"pruned at step {frozen.last_step} ({spec.metric} {frozen.intermediate_values[frozen.last_step]:.6g})"
    if frozen.state == TrialState.FAIL:
        return f"failed: {frozen.user_attrs.get('error', f'exit status {code}')}"
    if code == PREEMPTED_EXIT_CODE:
        return "stopped by a signal after its checkpoint; it resumes from there"
    if stopping and (code < 0 or code == INTERRUPTED_EXIT_CODE):
        return f"ended by the stop signal (exit status {code}); it resumes from its newest checkpoint, if any"
    reason = f"its process ended with exit status {code}" + (" (killed by a signal)" if code < 0 else "")
    _fail_trial(study, number, reason)
    return f"failed: {reason}"


# ----------------------------------------------------------------------------- one trial

class _Reporter:
    """The trainer's evaluation callback: report the objective to Optuna and ask its pruner."""

    def __init__(self, trial, spec: SweepSpec, frozen):
        self.trial, self.spec = trial, spec
        self.reported = set(frozen.intermediate_values)
        self.final_step: Optional[int] = None  # no pruning at the last step: the trial is as good as done
        self.last: Optional[tuple[int, float]] = None

    def __call__(self, step: int, result: dict) -> Optional[str]:
        metric = self.spec.metric
        scores = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metric not in scores:
            raise ConfigError(f"sweep file {self.spec.file}: objective.metric={metric!r} is not among the in-training "
                              f"evaluation's scores ({', '.join(scores)})")
        value = scores[metric]
        self.last = (step, value)
        self.trial.set_user_attr("scores", scores)
        self.trial.set_user_attr("step", step)
        if step not in self.reported:  # a resumed trial may evaluate a step again
            self.trial.report(value, step)
            self.reported.add(step)
        if (self.final_step is None or step < self.final_step) and self.trial.should_prune():
            return f"trial {self.trial.number} pruned by the {self.spec.pruner['kind']} pruner at step {step} " \
                   f"({metric} {value:.6g})"
        return None


def run_trial(spec: SweepSpec, number: int) -> int:
    """Run (or resume) trial ``number`` as an ordinary training run and tell Optuna how it ended.

    A trial stopped by a signal raises ``Preempted`` and stays RUNNING, to be resumed from its checkpoint.
    """
    from optuna.trial import Trial, TrialState

    study = open_study(spec, create=False)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ConfigError(f"sweep {spec.name}: no trial {number} (it has {len(trials)})")
    frozen = trials[number]
    if frozen.state != TrialState.RUNNING:
        raise ConfigError(f"sweep {spec.name}: trial {number} is {frozen.state.name.lower()}: nothing to run")
    lock = _Lock(_trial_lock(spec, number))
    if not lock.acquire():
        raise ConfigError(f"sweep {spec.name}: trial {number} is being run by {lock.holder()}")
    from ..training.stopping import Preempted

    trial = Trial(study, frozen._trial_id)
    try:
        return _train_trial(study, trial, spec, spec.trial_config(number, frozen.params), frozen)
    except Preempted:
        raise  # the trial stays RUNNING, claimed by its worker, to resume from its checkpoint
    except Exception as exc:  # bad input, a failed run, or a bug: the trial fails, saying why
        _fail_trial(study, number, first_line(exc) if isinstance(exc, MednistGanError) else
                    f"{type(exc).__name__}: {first_line(exc)}")
        raise
    finally:
        lock.release()


def _train_trial(study, trial, spec: SweepSpec, cfg: Config, frozen) -> int:
    from optuna.trial import TrialState

    from ..files import EXPORT_DIR
    from ..training.stopping import EndedEarly
    from ..training.trainer import Trainer

    reporter = _Reporter(trial, spec, frozen)
    trainer = Trainer(cfg, on_evaluation=reporter)
    reporter.final_step = trainer.total_steps
    try:
        try:
            trainer.fit()
        except EndedEarly as exc:
            study.tell(trial, state=TrialState.PRUNED)
            trainer.log.info("%s", exc)
            return 0
        if reporter.last is None or reporter.last[0] != trainer.state.step:
            trainer.evaluate()  # the objective of the generator that the export holds
        if cfg.export.at_end:
            trainer.export(cfg.run_path / EXPORT_DIR)
        value = reporter.last[1]
        if not math.isfinite(value):
            raise TrainingError(f"trial {trial.number}: {spec.metric} is {value} at the end")
        study.tell(trial, value)
        trainer.log.info("trial %d complete: %s %.6g at step %d", trial.number, spec.metric, value, trainer.state.step)
        return 0
    finally:
        trainer.tracking.finish()
