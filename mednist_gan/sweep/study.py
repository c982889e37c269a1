"""The sweep's Optuna study: its storage (a journal file or a database), sampler and pruner, and the search space
the first worker recorded in it, which every later worker must match."""

from __future__ import annotations

import zlib
from pathlib import Path

import yaml

from ..errors import ConfigError, first_line
from ..files import ensure_writable_folder, write_atomic
from .journal import CheckedJournal, check_journal
from .locks import claim_lock
from .spec import SweepSpec

RECORD_ATTR = "mednist_gan_sweep"  # the search space, as the study's first worker recorded it


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
    return JournalStorage(CheckedJournal(path))


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


def open_study(spec: SweepSpec, create: bool, salt: str = ""):
    """The sweep's study: created (with its recorded search space and enqueued trials) by the first worker.

    ``create=False``: an existing study with a sampler that samples nothing, for reporting and telling (the
    grid sampler's ``after_trial`` would stop an ``optimize`` loop that the ask-and-tell interface has not).
    """
    optuna = _optuna()
    ensure_writable_folder(spec.sweep_dir, "sweep_dir")
    storage = make_storage(spec.storage)
    sampler = make_sampler(spec, salt) if create else optuna.samplers.RandomSampler()  # a trial process samples nothing
    with claim_lock(spec):
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


def fail_trial(study, number: int, reason: str) -> None:
    """Trial ``number`` failed, saying why (unless it has ended otherwise already)."""
    from optuna.trial import Trial, TrialState

    frozen = frozen_trial(study, number)
    if frozen.state == TrialState.RUNNING:
        Trial(study, frozen._trial_id).set_user_attr("error", reason)
        study.tell(number, state=TrialState.FAIL)


def summary(study) -> str:
    """How many trials are complete, pruned, running, failed and waiting, in words."""
    from optuna.trial import TrialState

    counts = {s: 0 for s in ("complete", "pruned", "running", "failed", "waiting")}
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.RUNNING: "running",
             TrialState.FAIL: "failed", TrialState.WAITING: "waiting"}
    for t in study.get_trials(deepcopy=False):
        counts[names[t.state]] += 1
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)
