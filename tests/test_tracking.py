"""Experiment tracking: a real offline W&B run read back, TensorBoard events, fallbacks, failures."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from mednist_gan.config import load_config
from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, REPO, main_process_tracking
from wandb_records import config as wandb_config
from wandb_records import history, metric_definitions, read_records


def _cfg(debug_overrides, *extra):
    return load_config(CONFIGS / "debug.yaml", [*debug_overrides, *extra])


def _offline_runs(run_dir):
    return sorted((run_dir / "tracker" / "wandb").glob("offline-run-*"))


def test_offline_wandb_run_holds_losses_images_config_and_artifact(debug_overrides, tmp_path):
    train(_cfg(debug_overrides, "log.tracker=wandb", "log.mode=offline", "log.sample_every=2"))
    run = tmp_path / "run"
    (offline,) = _offline_runs(run)
    records = read_records(next(offline.glob("run-*.wandb")))
    rows = history(records)
    losses = {row["_step"]: row for row in rows if "loss_d" in row}
    assert sorted(losses) == [1, 2, 3, 4]  # log.every_steps=1 in the debug config
    for row in losses.values():
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "lr_g", "lr_d", "epoch"):
            assert math.isfinite(row[key]), (key, row)
    images = {row["_step"] for row in rows if row.get("samples/_type") == "image-file"}
    assert images == {2, 4}
    # The training step is the x-axis; in a run that never restarted it equals W&B's own step.
    assert metric_definitions(records)["*"] == "train/step"
    assert all(row["train/step"] == row["_step"] for row in rows)
    cfg = wandb_config(records)
    assert cfg["train.batch_size"] == 16 and cfg["name"] == "debug"
    assert any(r.WhichOneof("record_type") == "artifact" for r in records)
    # The same numbers and grids in the run directory, for people without W&B.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["loss_d"] == pytest.approx(losses[1]["loss_d"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert (run / "loss_curves.png").stat().st_size > 1000


def test_wandb_mode_environment_variable_wins(debug_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(_cfg(debug_overrides, "log.tracker=wandb", "log.mode=offline", "train.max_steps=1", "export.at_end=false"))
    assert _offline_runs(tmp_path / "run") == []
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_online_without_network_falls_back_to_offline_in_bounded_time(debug_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.monotonic()
    train(_cfg(debug_overrides, "log.tracker=wandb", "log.mode=online", "log.online_timeout=10",
               "train.max_steps=1", "export.at_end=false"))
    assert time.monotonic() - start < 120
    log = (tmp_path / "run" / "train.log").read_text()
    assert "falling back to offline" in log and "wandb sync" in log
    assert len(_offline_runs(tmp_path / "run")) == 1


@pytest.mark.slow
def test_tracker_failures_never_stop_training(debug_overrides, tmp_path):
    trainer = Trainer(_cfg(debug_overrides, "log.tracker=wandb", "log.mode=offline", "export.at_end=false"))

    def broken_log(*args, **kwargs):
        raise ConnectionError("tracker backend went away")

    trainer.acc.log = broken_log
    try:
        state = trainer.fit()
    finally:
        trainer.tracking.finish()
    assert state.step == 4
    assert "tracker failed to log metrics (ConnectionError" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_tensorboard_tracker_writes_event_files(debug_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(debug_overrides, "log.tracker=tensorboard", "log.sample_every=2", "export.at_end=false"))
    events = list((tmp_path / "run" / "tracker").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss_d")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("samples")] == [2, 4]


@pytest.mark.slow
def test_two_processes_make_exactly_one_wandb_run(tmp_path, mednist_root):
    import subprocess

    from helpers import REPO, train_cmd

    run = tmp_path / "run"
    result = subprocess.run(
        [*train_cmd(2), "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
         f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "log.tracker=wandb", "log.mode=offline",
         "export.at_end=false"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_offline_runs(run)) == 1
    rows = [r for r in history(read_records(next(_offline_runs(run)[0].glob("run-*.wandb")))) if "loss_d" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- a killed run, resumed

def _require_module(name: str):
    """The optional tracker packages come with the `test` extra: skip without one locally, fail on CI."""
    try:
        return __import__(name)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed - the test extra must provide it")
        pytest.skip(f"{name} is not installed")


def _train_cli(run, mednist_root, tmp_path, *overrides, env=None, timeout=600):
    import subprocess
    import sys

    # Each command its own W&B service, as from a shell (not the one an earlier test in this process started).
    full_env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run(
        [sys.executable, "-m", "mednist_gan", "train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
         f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides],
        cwd=REPO, env=dict(full_env, OMP_NUM_THREADS="1", **(env or {})), capture_output=True, text=True,
        timeout=timeout)


@pytest.mark.slow
def test_killed_and_resumed_run_logs_each_step_once_and_wandb_steps_only_increase(tmp_path, mednist_root):
    import signal

    run = tmp_path / "run"
    overrides = ["log.tracker=wandb", "log.mode=offline", "log.sample_every=2", "eval.every_steps=2",
                 "eval.num_samples=32", "export.at_end=false"]  # checkpoints every 2 steps (debug.yaml)
    # Killed while saving step 4: steps 3 and 4 (and step 4's evaluation and samples) were logged.
    killed = _train_cli(run, mednist_root, tmp_path, *overrides, env={"WANDB_MODE": "offline",
                                                                      "MEDNIST_GAN_CRASH_AT": "save:4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in first if "loss_d" in row] == [1, 2, 3, 4]
    # The same command again resumes from step 2 and logs steps 3 and 4 again.
    resumed = _train_cli(run, mednist_root, tmp_path, *overrides, env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (run / "train.log").read_text()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = {row["step"]: row for row in rows if "loss_d" in row}
    assert [row["step"] for row in rows if "loss_d" in row] == [1, 2, 3, 4]  # one line per step
    assert [row["step"] for row in rows if "eval/fmd" in row] == [2, 4]  # evaluations too
    from PIL import Image

    assert Image.open(run / "loss_curves.png").size[0] == 1500  # three panels: the FMD has its own

    # W&B: one file per process run; together their steps strictly increase, and every training step is there
    # with the values metrics.jsonl holds (the re-run's), plotted against train/step.
    files = [next(d.glob("run-*.wandb")) for d in _offline_runs(run)]
    assert len(files) == 2
    records = [read_records(f) for f in files]
    history_rows = [row for rs in records for row in history(rs)]
    steps = [row["_step"] for row in history_rows]
    assert steps == sorted(set(steps)), steps
    logged = {}
    for row in history_rows:
        if "loss_d" in row:
            logged[row["train/step"]] = row  # the later wins, as in metrics.jsonl
    assert sorted(logged) == [1, 2, 3, 4]
    for step, row in logged.items():
        for key in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert row[key] == pytest.approx(train_rows[step][key]), (step, key)
    resumed_steps = {row["train/step"] for row in history(records[1]) if "loss_d" in row}
    assert resumed_steps == {3, 4}
    assert {row["train/step"] for row in history(records[1]) if "eval/fmd" in row} == {4}
    assert all(metric_definitions(rs)["*"] == "train/step" for rs in records)


def test_start_keeps_the_metrics_of_steps_up_to_the_resumed_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = ['{"step": 1, "loss_d": 1.0}', '{"step": 2, "loss_d": 0.9}', '{"step": 2, "eval/fmd": 30.0}',
             '{"step": 3, "loss_d": 0.8}', '{"step": 4, "loss_d": 0.7}', '{"step": 4, "eval/fmd": 20.0}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "loss_')  # cut short by a kill
    main_process_tracking(run).start()  # resumed step unknown: nothing is dropped
    assert (run / "metrics.jsonl").read_text().startswith("\n".join(lines))
    main_process_tracking(run).start(2)
    assert (run / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    t = main_process_tracking(run)
    t.log_metrics({"loss_d": 0.5}, 3)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2, 3]
    main_process_tracking(run).start(0)  # a fresh start in a used run directory (no checkpoint)
    assert (run / "metrics.jsonl").read_text() == ""


# ----------------------------------------------------------------------------- any of Accelerate's trackers

def test_every_accelerate_tracker_is_a_choice():
    import typing

    from accelerate.utils import LoggerType

    from mednist_gan.config import LogConfig
    from mednist_gan.training.tracking import TRACKERS

    choices = set(typing.get_args(typing.get_type_hints(LogConfig)["tracker"]))
    assert choices == {"none"} | {t.value for t in LoggerType if t.value != "all"}
    assert set(TRACKERS) == choices - {"none"}


@pytest.mark.slow
def test_mlflow_tracker_records_metrics_and_config_and_skips_images_quietly(debug_overrides, tmp_path, monkeypatch):
    _require_module("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train(_cfg(debug_overrides, "log.tracker=mlflow", "log.sample_every=2", "export.at_end=false"))
    from mlflow.tracking import MlflowClient

    db = tmp_path / "run" / "tracker" / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(f"sqlite:///{db}")
    (found,) = client.search_runs([client.get_experiment_by_name("mednist-gan").experiment_id])
    assert found.info.run_name == "debug"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss_d")] == [1, 2, 3, 4]
    logged = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss_g")}
    local = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx({row["step"]: row["loss_g"] for row in local})
    assert found.data.params["train.batch_size"] == "16"
    # MLflow has no image logging in Accelerate: the grids stay in samples/, without a warning.
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert " WARNING " not in (tmp_path / "run" / "train.log").read_text()


_HIDE_TENSORBOARD = """
import importlib.machinery, sys

class Hide(importlib.machinery.PathFinder):  # as if tensorboard (and tensorboardX) were not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("tensorboard", "tensorboardX"):
            return None
        return super().find_spec(name, path, target)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from mednist_gan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_training(tmp_path, mednist_root):
    import subprocess
    import sys

    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _HIDE_TENSORBOARD, "train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}",
         f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "log.tracker=tensorboard"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # (Accelerate itself may warn first, when the check runs after the Accelerator is made.)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mednist-gan:")]
    assert line.startswith("mednist-gan: error: log.tracker=tensorboard:"), line
    assert 'pip install "mednist-gan[tensorboard]"' in line, line
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_check_tracker_installed_accepts_what_is_installed():
    from mednist_gan.training.tracking import check_tracker_installed

    for kind in ("none", "wandb", "tensorboard"):
        check_tracker_installed(kind)


# ----------------------------------------------------------------------------- loss curves

def test_loss_curves_get_an_fmd_panel_when_evaluation_ran(tmp_path):
    from PIL import Image

    from mednist_gan.training.records import plot_loss_curves

    rows = [{"step": s, "loss_d": 1 / s, "loss_g": s, "d_real": 0.6, "d_fake": 0.4} for s in (1, 2, 3, 4)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluated = tmp_path / "evaluated.jsonl"
    evals = [{"step": 2, "eval/fmd": 40.0, "eval/kid": 0.1}, {"step": 4, "eval/fmd": 25.0, "eval/kid": 0.05}]
    evaluated.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + evals[:1] + rows[2:] + evals[1:]))
    two = Image.open(plot_loss_curves(plain, tmp_path / "two.png"))
    three = Image.open(plot_loss_curves(evaluated, tmp_path / "three.png"))
    assert two.size == (1000, 350) and three.size == (1500, 350)
    assert plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
