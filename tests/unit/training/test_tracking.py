"""Experiment tracking: a real offline W&B run read back, TensorBoard events, fallbacks, failures."""

from __future__ import annotations

import json
import math

import pytest

from mednist_gan.training.trainer import train

from helpers import CONFIGS, debug_config, main_process_tracking, offline_wandb_runs, run_cli_without
from wandb_records import config as wandb_config
from wandb_records import history, metric_definitions, read_records


def test_offline_wandb_run_holds_losses_images_config_and_artifact(debug_overrides, tmp_path):
    train(debug_config(debug_overrides, "log.tracker=wandb", "log.mode=offline", "log.sample_every=2"))
    run = tmp_path / "run"
    (offline,) = offline_wandb_runs(run)
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
    # The run ends saying how to upload it.
    assert (run / "train.log").read_text().rstrip().endswith(f"W&B run saved offline; upload it with: wandb sync "
                                                             f"{offline}")


def test_wandb_mode_environment_variable_wins(debug_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    train(debug_config(debug_overrides, "log.tracker=wandb", "log.mode=offline", "train.max_steps=1",
                       "export.at_end=false"))
    assert offline_wandb_runs(tmp_path / "run") == []
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------- a killed run, resumed


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



def test_trackers_get_the_config_one_level_deep(tmp_path):
    """Lists as text, a mapping as one key per entry (a tracker such as TensorBoard takes only plain values)."""
    import logging
    from types import SimpleNamespace

    from mednist_gan.config import load_config
    from mednist_gan.training.tracking import Tracking

    overrides = ["model.arch=resnet", "data.classes=[Hand, CXR]", "data.class_weights={Hand: 3}",
                 "data.intensity={min: -1000, max: 1000}"]
    cfg = load_config(CONFIGS / "debug.yaml", overrides)
    flat = Tracking(cfg, SimpleNamespace(is_main_process=True), tmp_path, logging.getLogger("t"))._flat_config()
    assert flat["data.class_weights.Hand"] == 3.0 and "data.class_weights" not in flat
    assert flat["data.intensity.min"] == -1000.0 and flat["data.intensity.max"] == 1000.0
    assert flat["data.classes"] == "['Hand', 'CXR']" and flat["data.resize"] is None


# ----------------------------------------------------------------------------- any of Accelerate's trackers

def test_every_accelerate_tracker_is_a_choice():
    import typing

    from accelerate.utils import LoggerType

    from mednist_gan.config import LogConfig
    from mednist_gan.training.tracking import TRACKERS

    choices = set(typing.get_args(typing.get_type_hints(LogConfig)["tracker"]))
    assert choices == {"none"} | {t.value for t in LoggerType if t.value != "all"}
    assert set(TRACKERS) == choices - {"none"}


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_training(tmp_path, mednist_root):
    run = tmp_path / "run"
    result = run_cli_without(("tensorboard", "tensorboardX"), "train", "--config", str(CONFIGS / "debug.yaml"),
                             f"run_dir={run}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
                             "log.tracker=tensorboard")
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
