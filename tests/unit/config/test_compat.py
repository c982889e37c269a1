"""Files written by earlier versions keep working: a checkpoint and an export of 0.1.0 (tests/fixtures)."""

from __future__ import annotations

import json
import warnings

import pytest

from mednist_gan.config import ConfigWarning, config_from_record, load_config

from helpers import CONFIGS, V0_1_0_RUN, run_cli


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
    meta = json.loads((V0_1_0_RUN / "checkpoints" / "step_000002" / "checkpoint.json").read_text())
    recorded = config_from_record(meta["config"], "checkpoint.json")
    assert recorded.log.every_steps == 1 and recorded.runtime.foreach is None


def test_a_moved_key_on_the_command_line_is_one_warning_line(tmp_path):
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), "train.num_threads=1", "--dry-run")
    assert result.returncode == 0
    assert result.stderr.strip() == ("mednist-gan: warning: config key train.num_threads is now runtime.num_threads; "
                                     "please rename it")
