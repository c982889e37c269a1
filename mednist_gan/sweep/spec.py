"""A sweep's search-space file: read, checked against the config, and what each trial's config is.

Every value the sampler may pick is loaded as a trial's config would be, so that a bad search space is one
line naming the file and the key before any trial starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import Config, load_config, read_yaml
from ..errors import ConfigError

SPEC_KEYS = ("name", "base", "overrides", "sweep_dir", "storage", "trials", "budget", "objective", "sampler",
             "pruner", "enqueue", "params")
SAMPLER_OPTIONS = {"tpe": ("seed", "startup_trials"), "random": ("seed",), "grid": ("seed",)}
PRUNER_OPTIONS = {"median": ("startup_trials", "warmup_steps"),
                  "successive_halving": ("min_resource", "reduction_factor"), "none": ()}
# Keys each trial's config gets from the sweep; a search space may not set them.
SWEEP_OWNED_KEYS = ("name", "run_dir", "train.resume", "log.group")
JOURNAL_FILE = "optuna.journal"  # the default storage, in the sweep's folder
TRIALS_DIR = "trials"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
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
        """What every worker of one sweep must agree on (the number of trials may grow; paths may be spelled
        otherwise)."""
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
        return ConfigError(f"sweep file {self.file}: {where}: {message}" if where else
                           f"sweep file {self.file}: {message}")

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
    annotation = _key_type(spec, key, base, overrides)
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
    numeric = _numeric(annotation)
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
    """The annotation of a dotted config key, or of one entry of a mapping key (``data.class_weights.Hand``); an
    unknown key is the config's own one-line error."""
    annotation: Any = Config
    for part in key.split("."):
        if typing.get_origin(annotation) is dict:  # an entry: the config's checks judge its name
            annotation = typing.get_args(annotation)[1]
            continue
        hints = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else {}
        if part not in hints:
            try:
                load_config(base, list(overrides), {key: None})
            except ConfigError as exc:
                raise spec.error(f"params.{key}", str(exc)) from None
            raise spec.error(f"params.{key}", "not a config key")
        annotation = hints[part]
    if dataclasses.is_dataclass(annotation):
        raise spec.error(f"params.{key}", f"{key} is a section, not a key")
    return annotation


def _numeric(annotation: Any) -> Optional[type]:
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float) else None
