"""End-to-end training runs on real images: run directory, checkpoints, automatic and bitwise resume."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mednist_gan import checkpoint as ckpt
from mednist_gan.errors import CheckpointError, ConfigError
from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, checkpoint_weights, debug_config, forget_file_records, run_main


def test_debug_run_leaves_a_self_describing_run_dir(debug_overrides, tmp_path):
    trainer = train(debug_config(debug_overrides))
    run = tmp_path / "run"
    assert trainer.state.step == 4
    assert (run / "config.yaml").read_text().startswith("name: debug")
    assert (run / "git_revision.txt").read_text().strip()
    log = (run / "train.log").read_text()
    assert "epoch 0 step 4 loss_d=" in log and "nan" not in log.lower()
    assert ckpt.find_latest(run).name == "step_000004"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000002", "step_000004"]
    assert {p.name for p in (run / "export").iterdir()} >= {"model.pt", "mednist_gan.ts", "export.json", "bundle"}
    meta = ckpt.read_meta(run / "checkpoints" / "step_000004")
    assert meta["state"] == {"step": 4, "epoch": 1, "batch_in_epoch": 0}  # the one epoch is complete


def test_training_changes_the_weights_and_losses_are_finite(debug_overrides):
    cfg = debug_config(debug_overrides, "train.max_steps=2", "checkpoint.every_steps=null", "export.at_end=false")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.acc.unwrap_model(trainer.G).state_dict().items()}
    trainer.fit()
    after = trainer.acc.unwrap_model(trainer.G).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    real = trainer.gan_step.prepare_reals(next(iter(trainer.loader)))
    metrics = trainer.gan_step.run(real, step=trainer.state.step)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert 0 < metrics["d_real"] < 1 and 0 < metrics["d_fake"] < 1


def test_rerunning_a_finished_run_trains_nothing_more(debug_overrides, tmp_path):
    train(debug_config(debug_overrides))
    before = checkpoint_weights(ckpt.find_latest(tmp_path / "run"))
    export = tmp_path / "run" / "export"
    exported = {p.name: p.stat().st_mtime_ns for p in export.rglob("*")}
    trainer = train(debug_config(debug_overrides))
    assert trainer.state.step == 4
    after = checkpoint_weights(ckpt.find_latest(tmp_path / "run"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.name: p.stat().st_mtime_ns for p in export.rglob("*")} == exported  # not exported again
    assert f"{export} already holds the export of" in (tmp_path / "run" / "train.log").read_text()


def test_incomplete_or_stale_checkpoints_are_never_resumed_from(tmp_path):
    run = tmp_path / "run"
    good = run / "checkpoints" / "step_000002"
    good.mkdir(parents=True)
    (good / ckpt.META).write_text("{}")
    (run / "checkpoints" / ".tmp-step_000004").mkdir()  # killed mid-save
    (run / "checkpoints" / "step_000003").mkdir()  # no metadata: never published
    (run / "checkpoints" / "latest").write_text("step_000009\n")  # pointer to something gone
    assert ckpt.find_latest(run) == good
    ckpt.remove_stale_temporaries(run)
    assert not (run / "checkpoints" / ".tmp-step_000004").exists()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_and_nothing_runs(debug_overrides, tmp_path):
    train(debug_config(debug_overrides, "train.max_steps=2", "export.at_end=false"))
    latest = ckpt.find_latest(tmp_path / "run")
    marker = tmp_path / "pwned"
    with open(latest / "random_states_0.pkl", "wb") as f:
        pickle.dump({"evil": _Exploit(marker)}, f)
    # With its recorded checksum the file is simply damaged; a checkpoint written before checksums were
    # recorded is opened file by file, and weights_only loading must refuse the code.
    forget_file_records(latest)
    with pytest.raises(CheckpointError, match="random_states_0.pkl: refused"):
        Trainer(debug_config(debug_overrides, "export.at_end=false")).fit()
    assert not marker.exists(), "code inside the checkpoint was executed"


def test_resume_none_refuses_to_overwrite_an_earlier_run(debug_overrides):
    train(debug_config(debug_overrides, "train.max_steps=2", "export.at_end=false"))
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run"):
        Trainer(debug_config(debug_overrides, "train.resume=none")).fit()


def test_fp16_without_gpu_is_refused(debug_overrides):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is allowed")
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA GPU"):
        Trainer(debug_config(debug_overrides, "train.precision=fp16"))


def test_cli_train_on_missing_data_is_one_line(tmp_path):
    result = run_main("train", "--config", str(CONFIGS / "debug.yaml"), f"data.root={tmp_path / 'nowhere'}",
                     f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_residual_networks_train_export_and_keep_their_architecture(debug_overrides):
    """model.arch=resnet through the whole loop: steps, checkpoint, EMA, export; a resume names the changed arch."""
    tiny = ["model.arch=resnet", "model.resnet_g_channels=2", "model.resnet_d_channels=2", "train.max_steps=2",
            "train.ema_decay=0.9", "train.r1_gamma=1", "train.loss=hinge"]
    trainer = train(debug_config(debug_overrides, *tiny))
    assert trainer.state.step == 2 and type(trainer.acc.unwrap_model(trainer.G)).__name__ == "ResNetGenerator"
    exported = trainer.run_dir / "export"
    assert (exported / "mednist_gan.pt2").is_file() and (exported / "bundle" / "models" / "model.ts").is_file()
    with pytest.raises(CheckpointError, match="trained with model.arch='resnet', but the config says 'monai'"):
        Trainer(debug_config(debug_overrides, "train.max_steps=3")).fit()
