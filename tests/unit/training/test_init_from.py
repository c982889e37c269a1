"""train.init_from: a run that starts from trained weights with fresh optimizers (fine-tuning)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mednist_gan import checkpoint as ckpt
from mednist_gan.errors import CheckpointError, ConfigError

from helpers import REPO, small_trainer


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def weights(trainer, net) -> dict:
    return trainer.acc.unwrap_model(net).state_dict()


def test_a_checkpoint_gives_g_and_d_and_the_optimizers_start_afresh(checkpointed_run, tmp_path, mednist_root):
    trainer = small_trainer(tmp_path, mednist_root, f"train.init_from={checkpointed_run}", "train.ema_decay=0.9")
    latest = ckpt.find_latest(checkpointed_run)
    assert same(weights(trainer, trainer.G), load_file(str(latest / ckpt.G_FILE)))
    assert same(weights(trainer, trainer.D), load_file(str(latest / ckpt.D_FILE)))
    assert same(trainer.ema.state_dict(), load_file(str(latest / ckpt.G_FILE)))  # the average starts there too
    assert not trainer.opt_g.state and not trainer.opt_d.state and trainer.state.step == 0


@pytest.mark.parametrize("source", ["export", "export/model.pt"])
def test_an_export_gives_g_and_d_starts_from_its_seed(exported_run, tmp_path, mednist_root, source):
    trainer = small_trainer(tmp_path, mednist_root, f"train.init_from={exported_run / source}")
    assert same(weights(trainer, trainer.G), torch.load(exported_run / "export" / "model.pt", weights_only=True))
    fresh = small_trainer(tmp_path / "fresh", mednist_root)
    assert same(weights(trainer, trainer.D), weights(fresh, fresh.D))
    assert not same(weights(trainer, trainer.G), weights(fresh, fresh.G))


def test_the_shipped_hand_generator_starts_a_run_of_its_architecture_whatever_its_discriminator(tmp_path,
                                                                                               mednist_root):
    hand = REPO / "mednist_gan" / "assets" / "hand"
    trainer = small_trainer(tmp_path, mednist_root, f"train.init_from={hand}", "model.arch=resnet",
                            "model.latent_size=128", "model.resnet_g_channels=16", "model.resnet_d_channels=4",
                            "model.resnet_mbstd=0")  # another D: an export holds G alone
    assert same(weights(trainer, trainer.G), torch.load(hand / "model.pt", weights_only=True))


@pytest.mark.parametrize("source, error, message", [
    ("the run", CheckpointError, "trained with model.arch='monai', but the config says 'resnet'"),
    ("mednist_gan.ts", ConfigError, "holds no weights to train on; name the export's model.pt or folder"),
    ("missing", CheckpointError, "no such file or folder"),
])
def test_weights_that_do_not_fit_are_one_line(exported_run, tmp_path, mednist_root, source, error, message):
    path = {"the run": exported_run, "mednist_gan.ts": exported_run / "export" / "mednist_gan.ts",
            "missing": tmp_path / "missing"}[source]
    with pytest.raises(error, match=message) as caught:
        small_trainer(tmp_path, mednist_root, f"train.init_from={path}", "model.arch=resnet",
                      "model.resnet_g_channels=2", "model.resnet_d_channels=2")
    assert str(caught.value).startswith(f"train.init_from={path}: ") and "\n" not in str(caught.value)
