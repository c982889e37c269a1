"""Experiment tracking: a real offline W&B run read back, TensorBoard events, fallbacks, failures."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from mednist_gan.config import load_config
from mednist_gan.trainer import Trainer, train

from helpers import CONFIGS
from wandb_records import config as wandb_config
from wandb_records import history, read_records


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
    assert sorted(losses) == [1, 2, 3, 4]  # train.log_every=1 in the debug config
    for row in losses.values():
        for key in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "lr_g", "lr_d", "epoch"):
            assert math.isfinite(row[key]), (key, row)
    images = {row["_step"] for row in rows if row.get("samples/_type") == "image-file"}
    assert images == {2, 4}
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
