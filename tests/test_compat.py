"""Files written by earlier versions keep working: a checkpoint and an export of 0.1.0 (tests/fixtures)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import ConfigWarning, config_from_record, load_config
from mednist_gan.training.trainer import train

from helpers import CONFIGS, REPO, run_cli

FIXTURE = REPO / "tests" / "fixtures" / "v0.1.0_run"
# The tiny architecture the fixture was trained with (tests/fixtures/README.md).
TINY = ["model.latent_size=8", "model.start_shape=[8,8,8]", "model.g_channels=[4,4,4,1]",
        "model.d_channels=[2,2,2,2,1]", "train.ema_decay=0.9", "data.limit=16", "train.batch_size=8"]


@pytest.mark.slow
def test_a_0_1_0_checkpoint_resumes_and_exports(tmp_path, mednist_root):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    cfg = load_config(CONFIGS / "debug.yaml", [f"run_dir={run}", f"data.root={mednist_root}",
                                               f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4",
                                               "train.epochs=2", *TINY])
    trainer = train(cfg)
    assert trainer.state.step == 4
    assert "resumed from " + str(run / "checkpoints" / "step_000002") in (run / "train.log").read_text()
    assert ckpt.find_latest(run).name == "step_000004" and (run / "export" / "mednist_gan.ts").is_file()
    result = run_cli("export", "--checkpoint", str(FIXTURE / "checkpoints" / "step_000002"),
                     "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.pt", "mednist_gan.ts"])
def test_a_0_1_0_export_generates(tmp_path, name):
    result = run_cli("generate", "--model", str(FIXTURE / "export" / name), "--num-samples", "3",
                     "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "g").glob("*.png"))) == 3


def test_moved_config_keys_still_load_with_a_warning():
    with pytest.warns(ConfigWarning, match="model.cpu_mask_dropout is now runtime.cpu_mask_dropout"):
        cfg = load_config(CONFIGS / "debug.yaml", ["model.cpu_mask_dropout=false", "train.num_threads=1"])
    assert cfg.runtime.cpu_mask_dropout is False and cfg.runtime.num_threads == 1
    with pytest.warns(ConfigWarning, match="model.cpu_phase_split was removed"):
        load_config(CONFIGS / "debug.yaml", ["model.cpu_phase_split=true"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(CONFIGS / "debug.yaml", ["runtime.cpu_mask_dropout=false"])  # the new name: no warning


def test_log_every_and_foreach_moved_to_log_and_runtime_still_load_with_a_warning(tmp_path):
    with pytest.warns(ConfigWarning, match="train.log_every is now log.every_steps"):
        cfg = load_config(CONFIGS / "debug.yaml", ["train.log_every=7"])
    assert cfg.log.every_steps == 7
    with pytest.warns(ConfigWarning, match="optim.foreach is now runtime.foreach"):
        cfg = load_config(CONFIGS / "debug.yaml", ["optim.foreach=false"])
    assert cfg.runtime.foreach is False
    old = tmp_path / "old.yaml"  # a config file of an earlier version, on today's debug.yaml
    old.write_text(f"base: {CONFIGS / 'debug.yaml'}\ntrain:\n  log_every: 3\noptim:\n  foreach: true\n")
    with pytest.warns(ConfigWarning) as caught:
        cfg = load_config(old)
    assert cfg.log.every_steps == 3 and cfg.runtime.foreach is True
    assert sorted(str(w.message) for w in caught) == [
        "config key optim.foreach is now runtime.foreach; please rename it",
        "config key train.log_every is now log.every_steps; please rename it"]
    # A 0.1.0 checkpoint recorded both under their old names.
    meta = json.loads((FIXTURE / "checkpoints" / "step_000002" / "checkpoint.json").read_text())
    recorded = config_from_record(meta["config"], "checkpoint.json")
    assert recorded.log.every_steps == 1 and recorded.runtime.foreach is None


def test_a_moved_key_on_the_command_line_is_one_warning_line(tmp_path):
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), "train.num_threads=1", "--dry-run")
    assert result.returncode == 0
    assert result.stderr.strip() == ("mednist-gan: warning: config key train.num_threads is now runtime.num_threads; "
                                     "please rename it")
