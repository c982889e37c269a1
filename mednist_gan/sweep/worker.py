"""A sweep's worker: it claims trials from the study and runs each in a process of its own, side by side.

    mednist-gan sweep configs/sweeps/quality.yaml data.root=/data/MedNIST       # one worker, one trial at a time
    mednist-gan sweep configs/sweeps/quality.yaml --parallel 4                   # four trials side by side
    sbatch --array=0-15 slurm/sweep.sbatch configs/sweeps/quality.yaml data.root=/data/MedNIST   # 16 workers

A worker (``run_worker``) claims trials from the study, kept in Optuna's storage (by default a journal file
in the sweep's folder that workers on several nodes share; or a database URL), and runs each trial in a
process of its own (``mednist-gan sweep <file> --trial N``, ``trial.run_trial``). A trial stopped by a
signal stays claimed by its worker, which resumes it from its checkpoint when it starts again (a requeued
SLURM job); a trial whose worker is gone for good is taken over by another worker once no new trials are
left (``locks``: how a worker tells a stopped trial from a running one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

from ..errors import ConfigError
from ..files import ensure_writable_folder
from ..training.stopping import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, CatchStopSignals
from .locks import LiveLock, claim_lock, default_worker_id, held_by_someone, trial_lock_file, worker_lock_file
from .spec import SweepSpec
from .study import fail_trial, frozen_trial, open_study, summary


def _say(spec: SweepSpec, worker: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} sweep {spec.name} worker {worker}: {message}", flush=True)


def _claim(study, spec: SweepSpec, worker: str, busy: set[int]) -> Optional[tuple[int, str]]:
    """The next trial for this worker, and why: its own stopped trial, a new one, or one whose worker is gone."""
    from optuna.trial import Trial, TrialState

    with claim_lock(spec):
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
            if (owner is None or not held_by_someone(worker_lock_file(spec, owner))) \
                    and not held_by_someone(trial_lock_file(spec, t.number)):
                Trial(study, t._trial_id).set_user_attr("worker", worker)
                return t.number, f"taking it over from worker {owner}, which is gone; resuming from its checkpoint"
    return None


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
        lock = LiveLock(worker_lock_file(spec, worker))
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
    fail_trial(study, number, reason)
    return f"failed: {reason}"
