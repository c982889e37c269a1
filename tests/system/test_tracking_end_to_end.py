"""Trackers in whole training runs: W&B offline fallback, failing trackers, TensorBoard, MLflow, and a killed
run whose W&B steps only increase."""

from __future__ import annotations

import json
import os
import time

import pytest

from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, REPO, debug_config, offline_wandb_runs
from wandb_records import history, metric_definitions, read_records


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


def test_online_without_network_falls_back_to_offline_in_bounded_time(debug_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    start = time.monotonic()
    train(debug_config(debug_overrides, "log.tracker=wandb", "log.mode=online", "log.online_timeout=10",
                       "train.max_steps=1", "export.at_end=false"))
    assert time.monotonic() - start < 120
    log = (tmp_path / "run" / "train.log").read_text()
    assert "falling back to offline" in log and "wandb sync" in log
    assert len(offline_wandb_runs(tmp_path / "run")) == 1


def test_tracker_failures_never_stop_training(debug_overrides, tmp_path):
    trainer = Trainer(debug_config(debug_overrides, "log.tracker=wandb", "log.mode=offline", "export.at_end=false"))

    def broken_log(*args, **kwargs):
        raise ConnectionError("tracker backend went away")

    trainer.acc.log = broken_log
    try:
        state = trainer.fit()
    finally:
        trainer.tracking.finish()
    assert state.step == 4
    assert "tracker failed to log metrics (ConnectionError" in (tmp_path / "run" / "train.log").read_text()


def test_tensorboard_tracker_writes_event_files(debug_overrides, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(debug_config(debug_overrides, "log.tracker=tensorboard", "log.sample_every=2", "export.at_end=false"))
    events = list((tmp_path / "run" / "tracker").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss_d")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("samples")] == [2, 4]


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
    files = [next(d.glob("run-*.wandb")) for d in offline_wandb_runs(run)]
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


def test_mlflow_tracker_records_metrics_and_config_and_skips_images_quietly(debug_overrides, tmp_path, monkeypatch):
    _require_module("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train(debug_config(debug_overrides, "log.tracker=mlflow", "log.sample_every=2", "export.at_end=false"))
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
