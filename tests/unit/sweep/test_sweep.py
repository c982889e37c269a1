"""Sweeps: search-space files (bad ones are one-line errors), the study they make, and how workers claim trials.

The end-to-end sweep (an array job of workers, pruning, preemption, the report) is in test_slurm.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mednist_gan.cli import main
from mednist_gan.config import ConfigWarning, load_config
from mednist_gan.errors import ConfigError
from mednist_gan.sweep.locks import worker_lock_file
from mednist_gan.sweep.spec import load_sweep
from mednist_gan.sweep.study import frozen_trial, make_pruner, make_storage, open_study
from mednist_gan.sweep.trial import _Reporter
from mednist_gan.sweep.worker import _claim

from helpers import CONFIGS, run_cli, run_cli_without

SPACE = """\
base: {base}
overrides: [eval.num_samples=8]
trials: 3
budget: {{max_steps: 4, eval_every_steps: 2}}
params:
  optim.g_lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}
  train.loss: {{choices: [bce, ns, hinge]}}
  train.d_train_steps: {{low: 1, high: 3}}
"""


def _space(tmp_path: Path, text: str = SPACE, name: str = "space.yaml", **fields) -> Path:
    data = yaml.safe_load(text.format(base=CONFIGS / "debug.yaml"))
    data["sweep_dir"] = str(tmp_path / "sweep")
    data.update(fields)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_search_space_gives_each_trial_an_ordinary_run_config(tmp_path):
    spec = load_sweep(_space(tmp_path), ["data.limit=32"])
    assert [p.key for p in spec.params] == ["optim.g_lr", "train.loss", "train.d_train_steps"]
    assert spec.metric == "eval/fd_ssl" and spec.direction == "minimize"  # the defaults
    assert spec.sampler == {"kind": "tpe"} and spec.pruner == {"kind": "median"}
    assert spec.storage == str(tmp_path / "sweep" / "optuna.journal")
    cfg = spec.trial_config(7, {"optim.g_lr": 3e-3, "train.loss": "ns", "train.d_train_steps": 2})
    assert cfg.run_path == tmp_path / "sweep" / "trials" / "trial_0007"
    assert cfg.name == "space-trial_0007" and cfg.log.group == "space"  # the W&B group gathers the sweep
    assert (cfg.optim.g_lr, cfg.train.loss, cfg.train.d_train_steps) == (3e-3, "ns", 2)
    assert (cfg.train.max_steps, cfg.eval.every_steps, cfg.eval.num_samples, cfg.data.limit) == (4, 2, 8, 32)
    assert cfg.train.resume == "auto"  # a requeued trial resumes from its checkpoint


def test_a_parameter_can_be_one_entry_of_a_mapping_key(tmp_path):
    """data.class_weights.Hand, train.mode_seeking_classes.Hand: an entry is a parameter of the mapping's value type
    (a number, so a range works); an entry the config refuses is refused in one line naming it."""
    text = SPACE.replace("overrides: [eval.num_samples=8]",
                         "overrides: [eval.num_samples=8, model.arch=resnet, 'data.classes=[CXR, Hand]']")
    text = text.replace("  train.loss: {{choices: [bce, ns, hinge]}}\n",
                        "  data.class_weights.Hand: {{low: 1, high: 3}}\n"
                        "  train.mode_seeking_classes.Hand: {{choices: [0.0, 0.2]}}\n")
    spec = load_sweep(_space(tmp_path, text))
    cfg = spec.trial_config(0, {"optim.g_lr": 1e-3, "data.class_weights.Hand": 2.5,
                                "train.mode_seeking_classes.Hand": 0.0, "train.d_train_steps": 1})
    assert cfg.data.class_weights == {"Hand": 2.5} and cfg.train.mode_seeking_classes == {"Hand": 0.0}
    with pytest.raises(ConfigError, match=r"params.data.class_weights.Knee.low: data.class_weights.Knee=1.0 is not "
                                          r"allowed: expected a class of data.classes \(CXR, Hand\)"):
        load_sweep(_space(tmp_path, text.replace("data.class_weights.Hand", "data.class_weights.Knee")))


def test_every_shipped_search_space_loads(tmp_path):
    for path in sorted((CONFIGS / "sweeps").glob("*.yaml")):
        if path.name.startswith("wandb_"):
            continue
        spec = load_sweep(path, sweep_dir=tmp_path / path.stem)
        assert spec.trials >= 1 and spec.params
        for entry in spec.enqueue:  # enqueued trials build configs like sampled ones
            spec.trial_config(0, entry)


def test_the_search_space_in_docs_sweeps_md_loads(tmp_path):
    text = (CONFIGS.parent / "docs" / "sweeps.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "quality.yaml"
    path.write_text(block.replace("base: ../quality.yaml", f"base: {CONFIGS / 'quality.yaml'}"))
    spec = load_sweep(path, sweep_dir=tmp_path / "sweep")
    assert spec.name == "quality" and spec.trials == 64 and len(spec.params) == 4


def test_the_wandb_sweep_searches_real_config_keys_with_valid_values():
    wandb_sweep = yaml.safe_load((CONFIGS / "sweeps" / "wandb_quality.yaml").read_text())
    optuna_space = yaml.safe_load((CONFIGS / "sweeps" / "quality.yaml").read_text())
    assert set(wandb_sweep["parameters"]) == set(optuna_space["params"])  # the same search, online
    for key, spec in wandb_sweep["parameters"].items():
        for value in spec.get("values", [spec.get("min"), spec.get("max")]):
            load_config(CONFIGS / "quality.yaml", [f"{key}={value}"])
    assert "${args_no_hyphens}" in wandb_sweep["command"]  # key=value, as `mednist-gan train` takes overrides


BAD_SPACES = {
    "unknown parameter": ({"params": {"optim.glr": {"low": 1e-4, "high": 1e-3}}},
                          "params.optim.glr: unknown config key 'optim.glr': did you mean optim.g_lr?"),
    "empty range": ({"params": {"optim.g_lr": {"low": 1e-3, "high": 1e-4}}},
                    "params.optim.g_lr: empty range: low=0.001 must be below high=0.0001"),
    "equal bounds": ({"params": {"train.d_train_steps": {"low": 2, "high": 2}}},
                     "params.train.d_train_steps: empty range: low=2 must be below high=2"),
    "empty choices": ({"params": {"train.loss": {"choices": []}}},
                      "params.train.loss.choices=[] is not allowed: expected a non-empty list"),
    "wrong type of a choice": ({"params": {"train.batch_size": {"choices": [64, "big"]}}},
                               "params.train.batch_size.choices: train.batch_size='big' has the wrong type: "
                               "expected int"),
    "wrong type of a bound": ({"params": {"train.d_train_steps": {"low": 1, "high": 2.5}}},
                              "params.train.d_train_steps.high=2.5 is not allowed: expected an integer"),
    "a range of words": ({"params": {"train.loss": {"low": 1, "high": 2}}},
                         "params.train.loss: train.loss is not a number, so it has no range: give choices"),
    "a value the config refuses": ({"params": {"train.ema_decay": {"choices": [0.99, 1.5]}}},
                                   "train.ema_decay=1.5 is not allowed: expected a number in (0, 1) or null"),
    "a log range from zero": ({"params": {"train.r1_gamma": {"low": 0.0, "high": 1.0, "log": True}}},
                              "params.train.r1_gamma.low=0.0 is not allowed: expected a number > 0 with log: true"),
    "neither choices nor a range": ({"params": {"optim.g_lr": 0.001}},
                                    "params.optim.g_lr: expected {choices: [...]} or {low: ..., high: ...}, got 0.001"),
    "unknown key of a parameter": ({"params": {"optim.g_lr": {"low": 1e-4, "hihg": 1e-3}}},
                                   "unknown key 'params.optim.g_lr.hihg': did you mean params.optim.g_lr.high?"),
    "a key the sweep sets": ({"params": {"run_dir": {"choices": ["a", "b"]}}},
                             "params.run_dir: run_dir is set by the sweep for each trial"),
    "unknown top-level key": ({"trails": 5}, "unknown key 'trails': did you mean trials?"),
    "no trials": ({"trials": 0}, "trials=0 is not allowed: expected an integer >= 1"),
    "unknown sampler": ({"sampler": "cmaes"}, "sampler.kind='cmaes' is not allowed: expected one of tpe, random, grid"),
    "pruner option of another kind": ({"pruner": {"kind": "median", "reduction_factor": 3}},
                                      "unknown key 'pruner.reduction_factor': valid keys: kind, startup_trials, "
                                      "warmup_steps"),
    "bad direction": ({"objective": {"metric": "eval/fmd", "direction": "lower"}},
                      "objective.direction='lower' is not allowed: expected minimize or maximize"),
    "grid over a range": ({"sampler": "grid"},
                          "params.optim.g_lr: the grid sampler needs choices for every parameter"),
    "enqueued value outside the space": ({"enqueue": [{"optim.g_lr": 0.5}]},
                                         "enqueue[0].optim.g_lr=0.5 is not allowed: expected number in [0.0001, 0.01], "
                                         "log scale"),
    "bad base config value": ({"overrides": ["train.batch_size=0"]},
                              "base and overrides: train.batch_size=0 is not allowed: expected an integer >= 1"),
}


@pytest.mark.parametrize("change,message", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_a_bad_search_space_is_one_line_naming_the_file_and_key(tmp_path, capsys, change, message):
    path = _space(tmp_path, **change)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mednist-gan: error: sweep file {path}: "), err
    assert message in err, err
    assert not (tmp_path / "sweep").exists()  # refused before anything is written


def test_the_sweep_command_prints_one_line_without_traceback(tmp_path):
    path = _space(tmp_path, params={"optim.g_lr": {"low": 1e-2, "high": 1e-4}})
    result = run_cli("sweep", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "empty range" in result.stderr, result.stderr
    missing = run_cli("sweep-report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "sweep file" in missing.stderr and "does not exist" in missing.stderr


def test_a_grid_sweep_runs_each_point_once_at_most(tmp_path):
    path = _space(tmp_path, sampler={"kind": "grid", "seed": 0}, trials=None,
                  params={"train.loss": {"choices": ["bce", "ns"]}, "train.d_train_steps": {"choices": [1, 2, 3]}})
    assert load_sweep(path).trials == 6  # the grid's size when trials is not given
    with pytest.raises(ConfigError, match=r"trials=7 is not allowed: expected an integer from 1 to the grid's 6"):
        load_sweep(_space(tmp_path, name="g7.yaml", sampler="grid", trials=7,
                          params={"train.loss": {"choices": ["bce", "ns"]},
                                  "train.d_train_steps": {"choices": [1, 2, 3]}}))
    spec = load_sweep(path)
    study, teller = open_study(spec, create=True, salt="w"), open_study(spec, create=False)
    seen = set()
    while (claimed := _claim(study, spec, "w", set())) is not None:
        trial = study.get_trials(deepcopy=False)[claimed[0]]
        seen.add(tuple(sorted(trial.params.items())))
        teller.tell(trial.number, 1.0)  # as a trial's process tells
    assert len(seen) == 6


def test_workers_of_one_sweep_must_agree_on_its_search_space(tmp_path):
    path = _space(tmp_path)
    open_study(load_sweep(path), create=True)
    assert (tmp_path / "sweep" / "sweep.yaml").is_file()  # the recorded search space, for people
    changed = _space(tmp_path, params={"optim.g_lr": {"low": 1e-4, "high": 1e-1, "log": True}})
    with pytest.raises(ConfigError, match=r"was started with another search space \(params differ\)"):
        open_study(load_sweep(changed), create=True)
    open_study(load_sweep(_space(tmp_path, trials=10)), create=True)  # more trials: the same sweep, extended


def test_a_trial_reports_its_objective_and_the_pruner_decides_before_the_last_step(tmp_path):
    spec = load_sweep(_space(tmp_path, pruner={"kind": "median", "startup_trials": 1}, objective="eval/fmd"))
    study = optuna.create_study(pruner=make_pruner(spec))
    study.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={2: 1.0, 4: 1.0}))  # a complete trial
    trial = study.ask()
    reporter = _Reporter(trial, spec, frozen_trial(study, trial.number))
    reporter.final_step = 4
    verdict = reporter(2, {"eval/fmd": 5.0, "eval/kid": 0.25, "note": "not a score"})
    assert verdict == "trial 1 pruned by the median pruner at step 2 (eval/fmd 5)"
    assert reporter(2, {"eval/fmd": 5.0}) is not None  # a resumed trial may evaluate a step again: reported once
    assert reporter(4, {"eval/fmd": 6.0}) is None  # the last step: the trial is done, not pruned
    frozen = frozen_trial(study, trial.number)
    assert frozen.intermediate_values == {2: 5.0, 4: 6.0}
    assert frozen.user_attrs["scores"] == {"eval/fmd": 6.0} and frozen.user_attrs["step"] == 4
    other = load_sweep(_space(tmp_path, name="fid.yaml", objective="eval/fid"))
    with pytest.raises(ConfigError, match=r"objective.metric='eval/fid' is not among the in-training evaluation's "
                                          r"scores \(eval/fmd, eval/kid\)"):
        _Reporter(study.ask(), other, frozen)(2, {"eval/fmd": 5.0, "eval/kid": 0.25})


def test_successive_halving_prunes_a_trial_behind_the_others_at_its_rung(tmp_path):
    """The other pruner a search space may name: a trial reporting worse than the trials before it at the first
    rung (step 2 with min_resource 2) is pruned there; one reporting as well as the best is promoted."""
    spec = load_sweep(_space(tmp_path, pruner={"kind": "successive_halving", "min_resource": 2, "reduction_factor": 2},
                             objective="eval/fmd"))
    study = optuna.create_study(pruner=make_pruner(spec))
    for value in (1.0, 2.0, 3.0):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={2: value, 4: value}))
    good, bad = study.ask(), study.ask()
    for trial, value, pruned in ((good, 0.5, False), (bad, 9.0, True)):
        reporter = _Reporter(trial, spec, frozen_trial(study, trial.number))
        reporter.final_step = 6
        verdict = reporter(2, {"eval/fmd": value})
        assert (verdict is not None) == pruned, (value, verdict)
    assert "pruned by the successive_halving pruner at step 2" in verdict


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another live process holding a worker's lock, as a running worker does."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_worker_resumes_its_own_trial_first_and_takes_over_a_gone_workers_trial_last(tmp_path, storage):
    fields = {"storage": f"sqlite:///{tmp_path / 'sweep.db'}"} if storage == "sqlite" else {}
    spec = load_sweep(_space(tmp_path, trials=3, **fields))
    study = open_study(spec, create=True, salt="a")
    assert _claim(study, spec, "a", set())[0] == 0  # new
    assert _claim(study, spec, "b", set())[0] == 1  # new
    # Worker a starts again (a requeued job): its own unfinished trial first, not a new one.
    number, why = _claim(study, spec, "a", set())
    assert number == 0 and why.startswith("resuming it")
    assert _claim(study, spec, "a", {0})[0] == 2  # the last new trial
    study.tell(2, 1.0)
    # No new trials left. Worker b's trial 1 is not taken while b lives (holds its lock) ...
    worker_lock_file(spec, "b").parent.mkdir(exist_ok=True)
    holder = _hold_lock(worker_lock_file(spec, "b"))
    try:
        assert _claim(study, spec, "a", {0}) is None
    finally:
        holder.kill()
        holder.wait()
    # ... and is once b is gone for good: a resumes it from its checkpoint.
    number, why = _claim(study, spec, "a", {0})
    assert number == 1 and "from worker b, which is gone" in why
    assert study.get_trials(deepcopy=False)[1].user_attrs["worker"] == "a"
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.RUNNING, TrialState.RUNNING,
                                                                   TrialState.COMPLETE]


def test_a_worker_id_in_use_is_refused_in_one_line(tmp_path, capsys):
    path = _space(tmp_path)
    spec = load_sweep(path)
    worker_lock_file(spec, "w7").parent.mkdir(parents=True)
    holder = _hold_lock(worker_lock_file(spec, "w7"))
    try:
        assert main(["sweep", str(path), "--worker-id", "w7"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "worker id w7 is in use by a live process" in err, err


def _started_sweep(tmp_path: Path):
    """A sweep as its workers leave the journal, without training: trial 0 complete, trial 1 claimed."""
    spec = load_sweep(_space(tmp_path))
    study = open_study(spec, create=True, salt="a")
    _claim(study, spec, "a", set())
    study.tell(0, 1.0)
    _claim(study, spec, "a", set())
    return spec, Path(spec.storage)


def _cut_last_line(journal: Path) -> bytes:
    """Cut the journal's last line in the middle, as a writer killed mid-write leaves it; returns what is left of it."""
    data = journal.read_bytes()
    start = data[:-1].rfind(b"\n") + 1
    journal.write_bytes(data[:(start + len(data)) // 2])
    return data[start:(start + len(data)) // 2]


def _records(journal: Path) -> list[dict]:
    data = journal.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line a whole record


def test_a_cut_last_journal_line_is_moved_aside_and_the_workers_go_on(tmp_path, capsys):
    spec, journal = _started_sweep(tmp_path)
    lines = journal.read_bytes().count(b"\n")
    cut = _cut_last_line(journal)
    damaged = journal.read_bytes()

    # sweep-report reads the records before the cut line and changes nothing.
    assert main(["sweep-report", str(spec.file), "--no-export"]) == 0
    out, err = capsys.readouterr()
    assert err == (f"mednist-gan: warning: sweep journal {journal}: line {lines} is incomplete (a write in progress, "
                   f"or a writer killed mid-write): reading the {lines - 1} complete records before it\n")
    assert "sweep space: 1 complete, 1 running" in out
    assert journal.read_bytes() == damaged

    # The next worker moves the cut line aside, then appends whole records of its own.
    with pytest.warns(ConfigWarning,
                      match=rf"line {lines} was cut short \(a writer killed mid-write, or a full disk\): "
                            rf"moved it to optuna\.journal\.damaged-[0-9-]+; the {lines - 1} records"):
        study = open_study(spec, create=True, salt="b")
    [saved] = journal.parent.glob("optuna.journal.damaged-*")
    assert saved.read_bytes() == cut and damaged.startswith(journal.read_bytes())
    assert _claim(study, spec, "b", set())[0] == 2
    _records(journal)

    # Another writer killed mid-record while this worker runs: its next record does not go onto that line either.
    half = b'{"op_code":6,"worker_id":"x-1","trial_id":1,"sta'
    with journal.open("ab") as f:
        f.write(half)
    with pytest.warns(ConfigWarning, match="was cut short"):
        study.tell(2, 2.0)
    assert half in [p.read_bytes() for p in journal.parent.glob("optuna.journal.damaged-*")]
    _records(journal)
    fresh = optuna.load_study(study_name=spec.name, storage=make_storage(spec.storage))
    assert [t.state for t in fresh.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.COMPLETE]


def test_a_journal_line_that_is_not_a_record_stops_workers_and_the_report_in_one_line(tmp_path, capsys):
    spec, journal = _started_sweep(tmp_path)
    lines = journal.read_bytes().split(b"\n")
    # a record glued to a cut one
    lines[2] = b'{"op_code":4,"worker_id":"a-1","study_id":0,"datetime_start":"20' + lines[2]
    journal.write_bytes(b"\n".join(lines))
    damaged = journal.read_bytes()
    message = (f"sweep journal {journal} line 3: not a journal record (not JSON: Expecting ',' delimiter: "
               "column 67); nothing was changed: restore the journal from a copy, or mend or remove that line by hand")
    assert main(["sweep", str(spec.file), "--worker-id", "w"]) == 2
    assert capsys.readouterr().err == f"mednist-gan: error: {message}\n"
    report = run_cli("sweep-report", str(spec.file))
    assert report.returncode == 2 and report.stderr == f"mednist-gan: error: {message}\n", report.stderr
    assert journal.read_bytes() == damaged and not list(journal.parent.glob("*.damaged-*"))


def test_a_full_disk_while_a_worker_appends_to_the_journal_is_one_line_and_the_next_worker_goes_on(
        tmp_path, capsys, monkeypatch):
    spec, journal = _started_sweep(tmp_path)
    fsync = os.fsync

    def disk_full(fd: int) -> None:  # the disk fills up in the middle of the record being appended
        if os.path.samestat(os.fstat(fd), os.stat(journal)):
            os.ftruncate(fd, os.fstat(fd).st_size - 20)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    assert main(["sweep", str(spec.file), "--worker-id", "w"]) == 1
    monkeypatch.undo()
    assert capsys.readouterr().err == (f"mednist-gan: error: sweep journal {journal}: cannot be written (No space left "
                                       "on device); its complete records are intact: start the worker again once it "
                                       "can be written\n")
    assert not journal.read_bytes().endswith(b"\n")  # the record it was appending, cut
    with pytest.warns(ConfigWarning, match="was cut short"):
        study = open_study(spec, create=True, salt="w")
    assert _claim(study, spec, "w", set())[0] == 2
    _records(journal)


def test_sweep_report_on_a_sweep_that_never_ran_creates_nothing(tmp_path, capsys):
    path = _space(tmp_path)
    assert main(["sweep-report", str(path)]) == 2
    assert capsys.readouterr().err == (f"mednist-gan: error: sweep journal {tmp_path / 'sweep' / 'optuna.journal'} "
                                       "does not exist: the sweep has not started (run mednist-gan sweep first)\n")
    assert not (tmp_path / "sweep").exists()




@pytest.mark.parametrize("command", [["sweep", "configs/sweeps/quality.yaml", "--dry-run"],
                                     ["sweep-report", "configs/sweeps/quality.yaml"]])
def test_without_the_sweep_extra_a_sweep_command_is_one_line_naming_it(command, tmp_path):
    result = run_cli_without(("optuna",), *command)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip() == (f"mednist-gan: error: mednist-gan {command[0]} needs optuna, which is not "
                                     'installed: pip install "mednist-gan[sweep]"')


@pytest.mark.parametrize("name", ["quality.yaml", "conditional.yaml"])
def test_the_shipped_search_spaces_pass_every_check(name, capsys):
    """configs/sweeps/<name> passes every check of `sweep --dry-run` (keys, ranges, the enqueued first trial inside
    the space, the base config and overrides loading) and writes nothing."""
    path = CONFIGS / "sweeps" / name
    assert main(["sweep", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    assert "trials" in capsys.readouterr().out
