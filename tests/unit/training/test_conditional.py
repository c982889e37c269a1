"""Class-conditional training (several ``data.classes``): config, even class sampling, the loop, exports, generate."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import MEDNIST_CLASSES, ConfigWarning, load_config
from mednist_gan.data import EpochShuffleSampler, load_labelled_dataset
from mednist_gan.errors import ConfigError, MednistGanError
from mednist_gan.generator.generate import generate
from mednist_gan.generator.loader import open_generator
from mednist_gan.images import label_margin
from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, TINY_RESNET, TWO_CLASSES, reset_accelerate, run_cli


def _cfg(tmp_path, mednist_root, *overrides):
    return load_config(CONFIGS / "debug.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.limit=16", "train.batch_size=8", TWO_CLASSES, *TINY_RESNET, *overrides])


def test_several_classes_make_a_conditional_model_config(tmp_path, mednist_root):
    cfg = _cfg(tmp_path, mednist_root)
    assert cfg.model.classes == ["CXR", "Hand"]
    all_classes = load_config(CONFIGS / "debug.yaml", ["data.classes=[all]", *TINY_RESNET])
    assert all_classes.model.classes == list(MEDNIST_CLASSES)
    assert load_config(CONFIGS / "debug.yaml").model.classes == []  # one class: unconditional, the bundle's
    with pytest.raises(ConfigError,
                       match="model.arch='monai' is not allowed: expected 'resnet' for a class-conditional"):
        load_config(CONFIGS / "debug.yaml", [TWO_CLASSES])
    with pytest.raises(ConfigError, match=r"model.classes=\['Hand'\] is not allowed: expected nothing: it is set from"):
        load_config(CONFIGS / "debug.yaml", [TWO_CLASSES, *TINY_RESNET, "model.classes=[Hand]"])
    for bad, words in (("data.classes=[CXR, CXR]", "each class once"), ("data.classes=[all, CXR]", "[all] alone"),
                       ("data.classes=[]", "a list of class folder names")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(CONFIGS / "debug.yaml", [bad, *TINY_RESNET])
    with pytest.warns(ConfigWarning, match="data.class_name is now data.classes"):
        assert load_config(CONFIGS / "debug.yaml", ["data.class_name=CXR"]).data.classes == ["CXR"]


def test_labelled_data_and_even_class_sampling(tmp_path, mednist_root):
    cfg = _cfg(tmp_path, mednist_root).data
    images, labels = load_labelled_dataset(cfg, [1, 64, 64])
    assert images.shape == (32, 1, 64, 64) and labels.tolist() == [0] * 16 + [1] * 16
    # Uneven classes (90 of one, 10 of the other): an epoch draws both about equally, the same way every time.
    uneven = torch.tensor([0] * 90 + [1] * 10)
    sampler = EpochShuffleSampler(100, seed=3, labels=uneven)
    sampler.set_epoch(2)
    order = list(sampler)
    assert len(order) == 100 and order == list(sampler)
    drawn = uneven[order].float().mean().item()
    assert 0.35 < drawn < 0.65, drawn  # 10% of the images, half of the draws
    sampler.skip_in_epoch(2, 40)
    assert list(sampler) == order[40:]
    sampler.set_epoch(3)
    assert list(sampler) != order
    assert sorted(EpochShuffleSampler(100, seed=3, labels=torch.zeros(100, dtype=torch.long))) == list(range(100))


def test_class_weights_give_a_class_its_share_of_real_batches_and_generated_labels(tmp_path, mednist_root):
    """data.class_weights: {Hand: 3} of two classes is 3/4 of the real images D sees and of the labels G generates,
    whatever the classes' numbers of images; a bad name or weight is one config error naming the key."""
    uneven = torch.tensor([0] * 90 + [1] * 10)
    sampler = EpochShuffleSampler(4000, seed=3, labels=uneven.repeat(40), class_weights=[1.0, 3.0])
    assert 0.72 < uneven.repeat(40)[list(sampler)].float().mean().item() < 0.78
    assert list(sampler) == list(EpochShuffleSampler(4000, seed=3, labels=uneven.repeat(40), class_weights=[1.0, 3.0]))
    trainer = Trainer(_cfg(tmp_path, mednist_root, "data.class_weights={Hand: 3}", "train.mode_seeking=1"))
    assert trainer.cfg.data.sampling_weights == [1.0, 3.0]  # CXR (not named) weighs 1
    labels = torch.cat([trainer.gan_step.sample_labels(8, pairs=True) for _ in range(250)])
    assert torch.equal(labels[0::2], labels[1::2]) and 0.70 < labels.float().mean().item() < 0.80
    drawn = []  # the trainer's own loader: 10 epochs of 32 draws from 16 CXR and 16 Hand images
    for epoch in range(10):
        trainer.sampler.set_epoch(epoch)
        drawn += list(trainer.sampler)
    assert 0.65 < trainer.gan_step.real_labels(torch.tensor(drawn)).float().mean().item() < 0.85
    # Evenly, as before: the default draws what it always drew (a resumed run keeps its stream).
    even = Trainer(_cfg(tmp_path, mednist_root, f"run_dir={tmp_path / 'even'}"))
    assert even.cfg.data.sampling_weights is None and even.gan_step.label_weights is None
    for bad, words in (("data.class_weights={Hnd: 3}",
                        "data.class_weights.Hnd=3.0 is not allowed: expected a class of data.classes (CXR, Hand)"),
                       ("data.class_weights.Hand=0",
                        "data.class_weights.Hand=0.0 is not allowed: expected a weight > 0"),
                       ("data.class_weights=3",
                        "data.class_weights=3 has the wrong type: expected a mapping of str to float")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            _cfg(tmp_path, mednist_root, bad)
    with pytest.raises(ConfigError, match=re.escape("expected nothing: per-class values need several data.classes")):
        load_config(CONFIGS / "debug.yaml", ["data.class_weights={Hand: 2}"])


def test_conditional_training_exports_and_generates_every_class(tmp_path, mednist_root):
    trainer = train(_cfg(tmp_path, mednist_root, "train.max_steps=2", "log.num_samples=12", "log.sample_every=1"))
    assert trainer.num_classes == 2 and trainer.state.step == 2
    grid = np.asarray(Image.open(sorted((trainer.run_dir / "samples").glob("*.png"))[-1]))
    assert grid.shape == (2 * 66 + 2, label_margin(["CXR", "Hand"]) + 6 * 66 + 2)  # a row per class, named
    export = trainer.run_dir / "export"
    record = json.loads((export / "export.json").read_text())
    assert record["classes"] == ["CXR", "Hand"] and "labels" in record["inputs"]
    for model in (export / "mednist_gan.ts", export / "mednist_gan.pt2", export / "model.pt",
                  ckpt.find_latest(trainer.run_dir)):
        assert open_generator(model).classes == ["CXR", "Hand"], model
        one = generate(model, 3, tmp_path / model.name / "cxr", seed=1, class_name="CXR")
        assert len(one) == 3 and all(p.parent.name == "cxr" for p in one)
    every = generate(export / "mednist_gan.pt2", 3, tmp_path / "all", seed=1, class_name="all", grid=tmp_path / "g.png")
    assert sorted({p.parent.name for p in every}) == ["CXR", "Hand"] and len(every) == 6
    margin = label_margin(["CXR", "Hand"])  # a row per class, named on its left
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (2 * 66 + 2, margin + 3 * 66 + 2)
    # The label decides the image: the same latents as CXR and as Hand differ (the embedding has trained 2 steps).
    cxr = np.asarray(Image.open(every[0]), dtype=np.int16)
    hand = np.asarray(Image.open([p for p in every if p.parent.name == "Hand"][0]), dtype=np.int16)
    assert np.abs(cxr - hand).max() > 0
    with pytest.raises(MednistGanError,
                       match="a class-conditional generator of CXR, Hand; name the class with --class"):
        generate(export / "mednist_gan.pt2", 2, tmp_path / "x")
    with pytest.raises(MednistGanError, match="--class Knee: .* makes CXR, Hand"):
        generate(export / "mednist_gan.pt2", 2, tmp_path / "x", class_name="Knee")
    # The command line: --class all writes a folder per class; no --class is one line and exit 2.
    done = run_cli("generate", "--model", str(export / "mednist_gan.ts"), "--class", "all", "--num-samples", "2",
                   "--output-dir", str(tmp_path / "cli"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["CXR", "Hand"]
    refused = run_cli("generate", "--model", str(export / "mednist_gan.ts"), "--output-dir", str(tmp_path / "no"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and "--class" in refused.stderr
    assert not (tmp_path / "no").exists()


def test_mode_seeking_pairs_the_generators_latents_by_class(tmp_path, mednist_root):
    """train.mode_seeking: the generator's labels come in pairs (2k, 2k+1), the term is logged beside loss_g, and
    a per-process batch that cannot be paired is refused before training."""
    trainer = Trainer(_cfg(tmp_path, mednist_root, "train.max_steps=2", "train.mode_seeking=1"))
    labels = torch.cat([trainer.gan_step.sample_labels(8, pairs=True) for _ in range(20)])
    assert torch.equal(labels[0::2], labels[1::2]) and set(labels.tolist()) == {0, 1}
    trainer.fit()
    logged = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("mode_seeking", 0) > 0 for record in logged), logged
    reset_accelerate()
    with pytest.raises(ConfigError, match="train.mode_seeking .* per-process batch \\(7\\) must be even"):
        Trainer(_cfg(tmp_path, mednist_root, f"run_dir={tmp_path / 'odd'}", "train.mode_seeking=1",
                     "train.batch_size=7"))


def test_mode_seeking_classes_set_each_pairs_weight_by_its_class(tmp_path, mednist_root):
    """train.mode_seeking_classes={Hand: 0}: a generator update on Hand pairs is the update without the term, one on
    CXR pairs is not; all weights 0 turns the term off (no pairs, nothing logged)."""
    def updated(overrides, label):
        reset_accelerate()
        trainer = Trainer(_cfg(tmp_path, mednist_root, f"run_dir={tmp_path / str(len(overrides))}", *overrides))
        step = trainer.gan_step
        z = torch.randn(8, trainer.cfg.model.latent_size, generator=torch.Generator().manual_seed(1))
        step.generator_phase(z, torch.full((8,), trainer.cfg.model.classes.index(label)))
        return step, torch.cat([p.detach().flatten() for p in trainer.acc.unwrap_model(step.G).parameters()])

    without = {label: updated([], label)[1] for label in ("Hand", "CXR")}
    step, hand = updated(["train.mode_seeking=1", "train.mode_seeking_classes={Hand: 0}"], "Hand")
    assert step.mode_seeking.tolist() == [1.0, 0.0]  # label order: CXR, Hand
    assert torch.equal(hand, without["Hand"])
    _, cxr = updated(["train.mode_seeking=1", "train.mode_seeking_classes={Hand: 0}"], "CXR")
    assert not torch.allclose(cxr, without["CXR"])
    step, _ = updated(["train.mode_seeking=1", "train.mode_seeking_classes={Hand: 0, CXR: 0}"], "CXR")
    assert step.mode_seeking is None
    with pytest.raises(ConfigError, match=r"train.mode_seeking_classes.Knee=1.0 is not allowed: expected a class of"):
        _cfg(tmp_path, mednist_root, "train.mode_seeking_classes={Knee: 1}")


def test_an_unconditional_generator_refuses_a_class(tmp_path):
    from mednist_gan.generator.generate import SHIPPED_MODEL

    with pytest.raises(MednistGanError, match="--class CXR: .* is an unconditional generator"):
        generate(SHIPPED_MODEL, 2, tmp_path / "x", class_name="CXR")


def test_conditional_evaluation_scores_each_class(tmp_path, mednist_root):
    trainer = Trainer(_cfg(tmp_path, mednist_root, "eval.num_samples=16", "eval.keep_best=false"))
    result = trainer.evaluation(trainer.output_generator(), trainer.acc.autocast(), 0, {})
    assert {"eval/fd_ssl", "eval/CXR/fd_ssl", "eval/Hand/fd_ssl", "eval/Hand/fmd"} <= set(result)
    assert result["eval/CXR/fd_ssl"] != result["eval/Hand/fd_ssl"]


