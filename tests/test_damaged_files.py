"""Files damaged after they were written, and destinations that cannot be written (docs/reliability.md).

Every file the toolkit reads back either loads as written, is skipped or moved aside with one line
saying so, or stops the command with one line naming it; every place it writes fails with one line
naming the path, or (the run directory's own records) with a warning while training goes on.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import load_config
from mednist_gan.errors import CheckpointError
from mednist_gan.training.trainer import train

from helpers import CONFIGS, forget_file_records, main_process_tracking, reset_accelerate, run_cli

UNWRITABLE = Path("/proc/mednist-gan-test/x")  # /proc refuses new entries, even to root


def _cfg(run: Path, mednist_root: Path, cache: Path, *extra: str):
    return load_config(CONFIGS / "debug.yaml", [f"run_dir={run}", f"data.root={mednist_root}",
                                                f"data.cache_dir={cache}", "export.at_end=false", *extra])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, mednist_root) -> Path:
    """A debug run with complete checkpoints at steps 2 and 4 (copied by each test before it damages one)."""
    run = tmp_path_factory.mktemp("two") / "run"
    train(_cfg(run, mednist_root, run.parent / "cache"))
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000002", "step_000004"]
    reset_accelerate()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _cut(path: Path, size: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors cut to 100 bytes": lambda c: _cut(c / "model.safetensors"),
    "optimizer.bin with one byte changed": lambda c: _flip_one_byte(c / "optimizer.bin"),
    "latent_rng.pt missing": lambda c: (c / "latent_rng.pt").unlink(),
    "checkpoint.json garbage": lambda c: (c / ckpt.META).write_text("{not json"),
    "random_states_0.pkl empty": lambda c: (c / "random_states_0.pkl").write_bytes(b""),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(two_checkpoints, tmp_path, mednist_root,
                                                                       damage):
    run = _copy(two_checkpoints, tmp_path)
    newest = run / "checkpoints" / "step_000004"
    DAMAGE[damage](newest)
    trainer = train(_cfg(run, mednist_root, tmp_path / "cache", "train.max_steps=6", "train.epochs=2"))
    assert trainer.state.step == 6
    log = (run / "train.log").read_text()
    assert "checkpoint step_000004 is damaged" in log and "resuming from" in log
    assert "resumed from " + str(run / "checkpoints" / "step_000002") in log
    aside = run / "checkpoints" / "damaged-step_000004"
    assert aside.is_dir(), "the damaged checkpoint is kept for a person to inspect"
    assert ckpt.find_latest(run).name == "step_000006"


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_line_and_nothing_is_moved(two_checkpoints, tmp_path, mednist_root):
    run = _copy(two_checkpoints, tmp_path)
    for step in ("step_000002", "step_000004"):
        _cut(run / "checkpoints" / step / "model.safetensors")
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}", f"data.root={mednist_root}",
                     f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "no intact checkpoint (2 damaged, newest:" in result.stderr
    assert "step_000004/model.safetensors: 100 bytes" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]


def test_naming_a_damaged_checkpoint_to_resume_from_is_an_error(two_checkpoints, tmp_path, mednist_root):
    run = _copy(two_checkpoints, tmp_path)
    _flip_one_byte(run / "checkpoints" / "step_000002" / "model_1.safetensors")
    with pytest.raises(CheckpointError, match=r"step_000002/model_1.safetensors: content changed since it was written"):
        train(_cfg(run, mednist_root, tmp_path / "cache", f"train.resume={run / 'checkpoints' / 'step_000002'}"))


@pytest.mark.slow
def test_export_and_generate_check_the_checkpoint_they_read(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    _cut(run / "checkpoints" / "step_000004" / "model.safetensors")
    # A damaged checkpoint folder, named: one line.
    for args in (("export", "--checkpoint", str(run / "checkpoints" / "step_000004"), "--out", str(tmp_path / "e")),
                 ("generate", "--model", str(run / "checkpoints" / "step_000004"),
                  "--output-dir", str(tmp_path / "g"))):
        result = run_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "step_000004/model.safetensors: 100 bytes" in result.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "g").exists()
    # The run directory: its newest intact checkpoint, said so, and nothing moved (a reader does not move files).
    result = run_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    assert ("skipping damaged checkpoint" in result.stderr
            and "using " + str(run / "checkpoints" / "step_000002") in result.stderr)
    assert json.loads((tmp_path / "e" / "export.json").read_text())["step"] == 2
    assert (run / "checkpoints" / "step_000004").is_dir()


def test_checkpoints_written_before_checksums_are_checked_by_loading(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    for c in ckpt.complete_checkpoints(run):
        forget_file_records(c)
    _cut(run / "checkpoints" / "step_000004" / "model.safetensors")
    intact, damaged = ckpt.newest_intact(run)
    assert intact.name == "step_000002"
    assert [d.name for d, _ in damaged] == ["step_000004"] and "unreadable checkpoint file" in str(damaged[0][1])


def test_a_garbage_latest_pointer_falls_back_to_the_newest_complete_checkpoint(two_checkpoints, tmp_path):
    run = _copy(two_checkpoints, tmp_path)
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert ckpt.find_latest(run).name == "step_000004"
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()
    assert ckpt.find_latest(run).name == "step_000004"


# ----------------------------------------------------------------------------- exports and shipped files

@pytest.fixture(scope="module")
def exported(two_checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "export"
    result = run_cli("export", "--checkpoint", str(two_checkpoints), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.pt", "mednist_gan.ts"])
def test_a_damaged_export_is_named_in_one_line(exported, tmp_path, name):
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    _flip_one_byte(out / name)
    result = run_cli("generate", "--model", str(out / name), "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"{out / name}: damaged or replaced (its sha256 differs from the one in {out / 'export.json'})"
            in result.stderr)


@pytest.mark.slow
def test_a_damaged_export_record_is_named_in_one_line(exported, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    (out / "export.json").write_text("{cut sh")
    result = run_cli("generate", "--model", str(out / "model.pt"), "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{out / 'export.json'}: unreadable export" in result.stderr


def test_the_shipped_classifier_is_checked_against_its_card(tmp_path, monkeypatch):
    from mednist_gan.quality import classifier

    weights, card = tmp_path / "classifier.pt", tmp_path / "classifier.json"
    shutil.copy(classifier.WEIGHTS_FILE, weights)
    shutil.copy(classifier.CARD_JSON, card)
    monkeypatch.setattr(classifier, "WEIGHTS_FILE", weights)
    monkeypatch.setattr(classifier, "CARD_JSON", card)
    classifier.load_classifier()  # intact: loads
    _flip_one_byte(weights)
    with pytest.raises(CheckpointError, match="classifier.pt: damaged or replaced .* reinstall the package"):
        classifier.load_classifier()


def test_a_damaged_image_cache_is_rebuilt(tmp_path, mednist_root):
    from mednist_gan.data import list_images, load_images

    files = list_images(mednist_root / "Hand")[:4]
    first = load_images(files, cache_dir=str(tmp_path))
    (cache,) = tmp_path.glob("images-*.pt")
    _cut(cache)
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

@pytest.mark.slow
@pytest.mark.parametrize("case", ["export --out", "generate --output-dir", "generate --grid", "evaluate --out",
                                  "train run_dir", "train-classifier --out"])
def test_an_unwritable_destination_is_one_line_naming_it(case, two_checkpoints, tmp_path, mednist_root):
    args = {
        "export --out": ("export", "--checkpoint", str(two_checkpoints), "--out", str(UNWRITABLE)),
        "generate --output-dir": ("generate", "--num-samples", "2", "--output-dir", str(UNWRITABLE)),
        "generate --grid": ("generate", "--num-samples", "2", "--output-dir", str(tmp_path / "g"),
                            "--grid", str(UNWRITABLE / "grid.png")),
        "evaluate --out": ("evaluate", "--model", str(two_checkpoints), "--out", str(UNWRITABLE / "e.json")),
        "train run_dir": ("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={UNWRITABLE}"),
        "train-classifier --out": ("train-classifier", "--data-root", str(mednist_root), "--out",
                                   str(UNWRITABLE / "c.pt")),
    }[case]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("mednist-gan: error: ") and "cannot be created or written" in result.stderr
    assert str(UNWRITABLE) in result.stderr
