"""Files damaged after they were written, and destinations that cannot be written (docs/reliability.md).

Every file the toolkit reads back either loads as written, is skipped or moved aside with one line
saying so, or stops the command with one line naming it; every place it writes fails with one line
naming the path, or (the run directory's own records) with a warning while training goes on.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from mednist_gan import checkpoint as ckpt
from mednist_gan.errors import CheckpointError
from mednist_gan.training.trainer import train

from helpers import copy_run, cut, flip_one_byte, forget_file_records, main_process_tracking, run_config


def test_naming_a_damaged_checkpoint_to_resume_from_is_an_error(checkpointed_run, tmp_path, mednist_root):
    run = copy_run(checkpointed_run, tmp_path / "run")
    flip_one_byte(run / "checkpoints" / "step_000002" / "model_1.safetensors")
    with pytest.raises(CheckpointError, match=r"step_000002/model_1.safetensors: content changed since it was written"):
        train(run_config(run, mednist_root, tmp_path / "cache", f"train.resume={run / 'checkpoints' / 'step_000002'}"))


def test_checkpoints_written_before_checksums_are_checked_by_loading(checkpointed_run, tmp_path):
    run = copy_run(checkpointed_run, tmp_path / "run")
    for c in ckpt.complete_checkpoints(run):
        forget_file_records(c)
    cut(run / "checkpoints" / "step_000004" / "model.safetensors")
    intact, damaged = ckpt.newest_intact(run)
    assert intact.name == "step_000002"
    assert [d.name for d, _ in damaged] == ["step_000004"] and "unreadable checkpoint file" in str(damaged[0][1])


def test_a_garbage_latest_pointer_falls_back_to_the_newest_complete_checkpoint(checkpointed_run, tmp_path):
    run = copy_run(checkpointed_run, tmp_path / "run")
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert ckpt.find_latest(run).name == "step_000004"
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()
    assert ckpt.find_latest(run).name == "step_000004"


# ----------------------------------------------------------------------------- exports and shipped files


def test_the_shipped_classifier_is_checked_against_its_card(tmp_path, monkeypatch):
    from mednist_gan.quality import classifier

    weights, card = tmp_path / "classifier.pt", tmp_path / "classifier.json"
    shutil.copy(classifier.WEIGHTS_FILE, weights)
    shutil.copy(classifier.CARD_JSON, card)
    monkeypatch.setattr(classifier, "WEIGHTS_FILE", weights)
    monkeypatch.setattr(classifier, "CARD_JSON", card)
    classifier.load_classifier()  # intact: loads
    flip_one_byte(weights)
    with pytest.raises(CheckpointError, match="classifier.pt: damaged or replaced .* reinstall the package"):
        classifier.load_classifier()


def test_a_damaged_image_cache_is_rebuilt(tmp_path, mednist_root):
    from mednist_gan.data import list_images, load_images

    files = list_images(mednist_root / "Hand")[:4]
    first = load_images(files, cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("images-*.pt")
    cut(cache)
    assert torch.equal(load_images(files, cache_dir=str(tmp_path)), first)
    assert torch.equal(load_images(files, cache_dir=str(tmp_path)), first)  # and the rebuilt cache reads back


# ----------------------------------------------------------------------------- the run directory's records

def test_a_damaged_wandb_run_id_gives_a_new_run_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "wandb_run_id.txt").write_bytes(b"\x00\xff garbage \n")
    tracking = main_process_tracking(run)
    with caplog.at_level(logging.WARNING, logger="mednist_gan"):
        logging.getLogger("mednist_gan").propagate = True
        new_id = tracking._wandb_run_id(tmp_path / "wandb")
    assert new_id and (run / "wandb_run_id.txt").read_text().strip() == new_id
    assert "wandb_run_id.txt is unreadable" in caplog.text
    assert tracking._wandb_run_id(tmp_path / "wandb") == new_id  # and it is kept from then on


def test_unwritable_run_records_warn_once_and_training_records_go_on(tmp_path, caplog):
    from mednist_gan.training.records import plot_loss_curves

    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # cannot be appended to
    tracking = main_process_tracking(run)
    logging.getLogger("mednist_gan").propagate = True
    with caplog.at_level(logging.WARNING, logger="mednist_gan"):
        tracking.log_metrics({"loss_d": 0.5, "loss_g": 1.0}, 1)
        tracking.log_metrics({"loss_d": 0.5, "loss_g": 1.0}, 2)
    assert caplog.text.count("could not write metrics.jsonl") == 1
    # A line cut short by a killed process does not stop the loss curves.
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss_d": 0.5, "loss_g": 1.0, "d_real": 0.6, "d_fake": 0.4}\n{"step": 2, "loss_')
    assert plot_loss_curves(metrics, tmp_path / "curves.png").is_file()


def test_an_unreadable_best_record_is_moved_aside_not_overwritten(tmp_path):
    from mednist_gan.training.in_training_eval import read_best_score

    best = tmp_path / "best"
    best.mkdir()
    (best / "model.pt").write_bytes(b"weights")
    (best / "export.json").write_text("{")
    assert read_best_score(best, "eval/fmd", logging.getLogger("mednist_gan")) == float("inf")
    assert not best.exists() and (tmp_path / "damaged-best" / "model.pt").read_bytes() == b"weights"
    # nothing there: a new best
    assert read_best_score(best, "eval/fmd", logging.getLogger("mednist_gan")) == float("inf")


# ----------------------------------------------------------------------------- destinations that cannot be written

