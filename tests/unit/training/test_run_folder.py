"""One training process per run folder, refusals that leave it as it was, and checkpoints read while they change
or written by a newer version (docs/reliability.md)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from mednist_gan import __version__
from mednist_gan import checkpoint as ckpt
from mednist_gan.cli import main
from mednist_gan.config.load import load_config
from mednist_gan.errors import MednistGanError
from mednist_gan.training.state import config_changes
from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, copy_run, file_hashes, run_config, run_overrides


def _edit_meta(checkpoint: Path, edit) -> None:
    meta = json.loads((checkpoint / ckpt.META).read_text())
    edit(meta)
    (checkpoint / ckpt.META).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- one run per run folder


def test_a_trainer_made_again_in_the_same_process_may_use_its_run_folder(checkpointed_run, tmp_path, mednist_root):
    """A process that made a Trainer (a notebook, a test) may train in its run folder again; train() lets it go."""
    run = copy_run(checkpointed_run, tmp_path / "run")
    Trainer(run_config(run, mednist_root, tmp_path / "cache"))  # holds the lock
    assert train(run_config(run, mednist_root, tmp_path / "cache")).state.step == 4
    assert (run / ".lock").read_text().split()[0] == str(os.getpid())
    with open(run / ".lock") as f:  # released: another process could take it now
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ----------------------------------------------------------------------------- refusals leave the run folder as it was

@pytest.mark.parametrize("override, message", [
    ("model.g_channels=[16, 16, 8, 1]", r"trained with model.g_channels=\[32, 16, 8, 1\]"),
    ("train.resume=none", "holds checkpoints of an earlier run"),
    ("train.ema_decay=0.9", "has no ema.safetensors"),
])
def test_a_refused_rerun_leaves_the_run_folder_as_it_was(checkpointed_run, tmp_path, mednist_root, override, message):
    run = copy_run(checkpointed_run, tmp_path / "run")
    (run / "checkpoints" / ".tmp-step_000006").mkdir()  # a killed save's leftovers: removed only by a run that starts
    before = file_hashes(run, folders=True)
    with pytest.raises(MednistGanError, match=message):
        train(run_config(run, mednist_root, tmp_path / "cache", override))
    after = file_hashes(run, folders=True)
    after[".lock"] = before[".lock"]  # the lock file names the process that holds it
    assert after == before  # config.yaml, git_revision.txt, train.log, loss_curves.png, checkpoints


def test_a_damaged_checkpoint_that_cannot_be_moved_aside_is_one_line(checkpointed_run, tmp_path, mednist_root,
                                                                      monkeypatch, capsys):
    run = copy_run(checkpointed_run, tmp_path / "run")
    damaged = run / "checkpoints" / "step_000004"
    (damaged / "model.safetensors").write_bytes(b"cut")
    before = file_hashes(run, folders=True)
    rename = os.rename

    def read_only_checkpoints(src, dst):  # what a read-only checkpoints/ does (root ignores chmod 0o555)
        if Path(src).parent == damaged.parent:
            raise PermissionError(13, "Permission denied", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", read_only_checkpoints)
    code = main(["train", "--config", str(CONFIGS / "debug.yaml"),
                 *run_overrides(run, mednist_root, tmp_path / "cache", "train.max_steps=6", "train.epochs=2")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mednist-gan: error: cannot move damaged checkpoint {damaged} aside (Permission denied); "
                          f"it is damaged ({damaged / 'model.safetensors'}: 3 bytes, "), err
    assert f"make {damaged.parent} writable, or move step_000004 elsewhere yourself, then run again to resume " \
           "from step_000002" in err
    assert file_hashes(run, folders=True) == before  # nothing written: not even config.yaml


# ----------------------------------------------------------------------------- checkpoints of a newer version

UNKNOWN = {
    "top level": ("written_by_the_future", lambda m: m.update(written_by_the_future=1)),
    "state": ("state.tokens_seen", lambda m: m["state"].update(tokens_seen=1024)),
    "config.model": ("config.model.g_attention", lambda m: m["config"]["model"].update(g_attention=True)),
    "config.train": ("config.train.lookahead", lambda m: m["config"]["train"].update(lookahead=5)),
}


def _warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("level", list(UNKNOWN))
def test_unknown_checkpoint_keys_are_ignored_with_one_warning(checkpointed_run, tmp_path, mednist_root, level, caplog,
                                                              monkeypatch):
    key, edit = UNKNOWN[level]
    runs = {name: copy_run(checkpointed_run, tmp_path / name) for name in ("export", "generate", "resume")}
    for run in runs.values():
        _edit_meta(run / "checkpoints" / "step_000004", edit)
    monkeypatch.setattr(logging.getLogger("mednist_gan"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="mednist_gan")

    def expect_one_warning(run: Path) -> None:
        said = _warnings_about(caplog, "keys this version does not know")
        assert said == [f"{run / 'checkpoints' / 'step_000004' / ckpt.META}: ignoring keys this version does not "
                        f"know: {key}"], said
        caplog.clear()

    assert main(["export", "--checkpoint", str(runs["export"]), "--out", str(tmp_path / "exported")]) == 0
    expect_one_warning(runs["export"])
    assert main(["generate", "--model", str(runs["generate"] / "checkpoints" / "step_000004"), "--num-samples", "2",
                 "--output-dir", str(tmp_path / "generated")]) == 0
    expect_one_warning(runs["generate"])
    assert len(list((tmp_path / "generated").glob("*.png"))) == 2
    trainer = train(run_config(runs["resume"], mednist_root, tmp_path / "cache", "train.max_steps=6", "train.epochs=2"))
    assert trainer.state.step == 6
    log = (runs["resume"] / "train.log").read_text()
    assert log.count("keys this version does not know") == 1 and key in log
    assert "resumed from " + str(runs["resume"] / "checkpoints" / "step_000004") in log


def test_a_checkpoint_of_a_newer_version_resumes_with_a_warning(checkpointed_run, tmp_path, mednist_root):
    assert ckpt.read_meta(ckpt.find_latest(checkpointed_run))["version"] == __version__
    run = copy_run(checkpointed_run, tmp_path / "run")
    _edit_meta(run / "checkpoints" / "step_000004", lambda m: m.update(version="99.0"))
    trainer = train(run_config(run, mednist_root, tmp_path / "cache", "train.max_steps=5", "train.epochs=2"))
    assert trainer.state.step == 5
    log = (run / "train.log").read_text()
    warning = (f"{run / 'checkpoints' / 'step_000004' / ckpt.META}: written by mednist-gan 99.0, newer than this one "
               f"({__version__}); upgrade mednist-gan to use everything it recorded")
    assert log.count(warning) == 1, log
    assert ckpt.read_meta(ckpt.find_latest(run))["version"] == __version__  # the new checkpoint: this version's


def test_a_resume_says_which_config_keys_changed(checkpointed_run, tmp_path, mednist_root):
    run = copy_run(checkpointed_run, tmp_path / "run")
    train(run_config(run, mednist_root, checkpointed_run.parent / "cache", "train.max_steps=5", "train.epochs=2",
                     "optim.betas=[0.0, 0.99]"))  # the run's own data and cache
    (line,) = [line for line in (run / "train.log").read_text().splitlines() if "config keys changed" in line]
    assert line.endswith(f"{run / 'checkpoints' / 'step_000004'}: resuming with config keys changed since it was "
                         "written: optim.betas: [0.5, 0.999] -> [0.0, 0.99]; train.epochs: 1 -> 2; "
                         "train.max_steps: 4 -> 5"), line



def test_mapping_keys_are_compared_whole_and_keys_a_checkpoint_lacks_are_not():
    overrides = ["model.arch=resnet", "data.classes=[Hand, CXR]", "data.class_weights={Hand: 3}",
                 "data.intensity={min: -1000, max: 1000}"]
    cfg = load_config(CONFIGS / "debug.yaml", overrides)
    saved = cfg.to_dict()
    saved["data"].update(class_weights={"Hand": 2}, intensity=None)
    del saved["data"]["resize"]  # written by a version without the key
    saved["run_dir"] = "elsewhere"
    assert config_changes(saved, cfg) == ["data.class_weights: {Hand: 2} -> {Hand: 3.0}",
                                          "data.intensity: null -> {max: 1000.0, min: -1000.0}"]


# ----------------------------------------------------------------------------- a run folder read while it trains

def _save_step_6_and_rotate_step_4_away(run: Path) -> None:
    """What a training process with checkpoint.keep=1 does to the checkpoints folder when it saves."""
    root = run / "checkpoints"
    shutil.copytree(root / "step_000004", root / "step_000006")
    (root / "latest").write_text("step_000006\n")
    shutil.rmtree(root / "step_000004")


def _rotate_once(monkeypatch, run: Path, when: str) -> list[bool]:
    """Rotate step 4 away right after it is chosen (``find_latest``) or when its first file is read
    (``sha256_file``); the list returned holds True once it happened."""
    fired, find_latest, sha256_file = [], ckpt.find_latest, ckpt.sha256_file

    def rotate() -> None:
        if not fired:
            fired.append(True)
            _save_step_6_and_rotate_step_4_away(run)

    def chosen_then_rotated(run_dir):
        chosen = find_latest(run_dir)
        rotate()
        return chosen

    def rotated_while_read(path):
        rotate()
        return sha256_file(path)

    if when == "right after it is chosen":
        monkeypatch.setattr(ckpt, "find_latest", chosen_then_rotated)
    else:
        monkeypatch.setattr(ckpt, "sha256_file", rotated_while_read)
    return fired


@pytest.mark.parametrize("when", ["right after it is chosen", "while it is read"])
def test_a_checkpoint_rotated_away_while_it_is_read_is_not_damaged(checkpointed_run, tmp_path, when, monkeypatch,
                                                                    caplog):
    from mednist_gan.generator.generate import generate

    monkeypatch.setattr(logging.getLogger("mednist_gan"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="mednist_gan")
    run = copy_run(checkpointed_run, tmp_path / "resolved")
    with monkeypatch.context() as patch:
        fired = _rotate_once(patch, run, when)
        assert ckpt.resolve(run) == run / "checkpoints" / "step_000006"
    assert fired
    run = copy_run(checkpointed_run, tmp_path / "generated")
    fired = _rotate_once(monkeypatch, run, when)
    assert len(generate(run, 2, tmp_path / "out", device="cpu")) == 2  # mednist-gan generate --model <run_dir>
    assert fired
    assert not _warnings_about(caplog, "damaged"), caplog.text
