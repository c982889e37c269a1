"""One trial of a sweep, in a process of its own: an ordinary training run in ``<sweep_dir>/trials/trial_N`` whose
in-training evaluations go to Optuna's pruner through the trainer's evaluation callback.

A trial stopped by a signal stays claimed by its worker, which resumes it from its checkpoint when it starts again.
"""

from __future__ import annotations

import math
from typing import Optional

from ..config import Config
from ..errors import ConfigError, MednistGanError, TrainingError, first_line
from .locks import LiveLock, trial_lock_file
from .spec import SweepSpec
from .study import fail_trial, open_study


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
    lock = LiveLock(trial_lock_file(spec, number))
    if not lock.acquire():
        raise ConfigError(f"sweep {spec.name}: trial {number} is being run by {lock.holder()}")
    from ..training.stopping import Preempted

    trial = Trial(study, frozen._trial_id)
    try:
        return _train_trial(study, trial, spec, spec.trial_config(number, frozen.params), frozen)
    except Preempted:
        raise  # the trial stays RUNNING, claimed by its worker, to resume from its checkpoint
    except Exception as exc:  # bad input, a failed run, or a bug: the trial fails, saying why
        fail_trial(study, number, first_line(exc) if isinstance(exc, MednistGanError) else
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
