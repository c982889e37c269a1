"""Augmenting what D sees (train.d_augment): the transforms, ADA's probability, and a short run with each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mednist_gan.training.d_augment import AdaptiveProbability, augment, cutout, draw, translate
from mednist_gan.training.step import GanStep

from helpers import small_trainer

SOLO = SimpleNamespace(reduce=lambda tensor, reduction: tensor)  # one process: reducing changes nothing


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_translation_moves_whole_pixels_and_fills_with_zeros():
    x = images()
    moved = translate(x, torch.tensor([[2.0, -1.0], [0.0, 0.0], [-2.0, 2.0], [1.0, 1.0]]))
    assert torch.equal(moved[0, :, 2:, :-1], x[0, :, :-2, 1:]) and moved[0, :, :2].abs().sum() == 0
    assert moved[0, :, :, -1].abs().sum() == 0
    assert torch.equal(moved[1], x[1])
    assert torch.equal(moved[2, :, :-2, 2:], x[2, :, 2:, :-2])


def test_cutout_zeroes_a_square_of_half_the_side_where_on():
    x = torch.ones(2, 1, 16, 16)
    cut = cutout(x, torch.tensor([[8.0, 8.0], [8.0, 8.0]]), torch.tensor([1.0, 0.0]))
    assert cut[0, 0, 5:12, 5:12].sum() == 0 and cut[0].sum() == 256 - 7 * 7
    assert torch.equal(cut[1], x[1])


def test_colour_transforms_and_nothing_when_every_transform_is_off():
    x = images()
    params = draw(4, 16, 1.0, "cpu", torch.Generator().manual_seed(1))
    params[:, 1:4] = 0  # brightness only
    assert torch.allclose(augment(x, params), x + params[:, 4].view(-1, 1, 1, 1))
    params[:, :4] = 0
    assert torch.equal(augment(x, params), x)
    assert torch.equal(augment(x, draw(4, 16, 0.0, "cpu", torch.Generator().manual_seed(2))), x)  # p = 0


def test_augmentation_is_differentiable_in_the_images():
    x = images().requires_grad_(True)
    augment(x, draw(4, 16, 1.0, "cpu", torch.Generator().manual_seed(3))).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_draws_are_seeded_and_each_transform_is_on_with_probability_p():
    a, b = (draw(20_000, 64, 0.3, "cpu", torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b)
    assert torch.allclose(a[:, :4].mean(0), torch.full((4,), 0.3), atol=0.02)
    assert a[:, 6:8].abs().max() == 8 and 0 <= a[:, 8:10].min() and a[:, 8:10].max() <= 63


def test_ada_raises_p_while_d_is_sure_of_the_reals_and_lowers_it_below_the_target():
    ada = AdaptiveProbability(target=0.6, ada_images=800, images_per_iteration=100, device="cpu")
    for _ in range(4):
        ada.observe(torch.tensor(0.9))
    ada.adjust(SOLO)
    assert ada.r_t == pytest.approx(0.9) and ada.p == pytest.approx(0.5)  # 4 x 100 of 800 images
    for _ in range(8):
        ada.observe(torch.tensor(1.0))
    ada.adjust(SOLO)
    assert ada.p == 1.0  # at most 1
    ada.observe(torch.tensor(0.2))
    ada.adjust(SOLO)
    assert ada.p == pytest.approx(0.875)
    saved = ada.state(SOLO)
    again = AdaptiveProbability(0.6, 800, 100, "cpu")
    again.restore(saved)
    assert again.state(SOLO) == saved


@pytest.mark.parametrize("mode", ["diffaugment", "ada"])
def test_a_short_run_with_each_mode_logs_its_probability(mode, tmp_path, mednist_root):
    trainer = small_trainer(tmp_path, mednist_root, f"train.d_augment={mode}", "train.ada_images=64",
                            "train.max_steps=8", "train.epochs=8", "export.at_end=false", "train.d_train_steps=1")
    trainer.fit()
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all('"augment_p"' in row for row in rows)
    if mode == "ada":  # 16 images: D is soon sure of them, and p rises from 0
        assert trainer.gan_step.ada.p > 0 and '"ada_r_t"' in rows[-1]


def test_each_process_draws_its_slice_of_the_global_batchs_parameters():
    def process(rank: int, world: int):
        return SimpleNamespace(ada=None, acc=SimpleNamespace(num_processes=world, device="cpu", process_index=rank),
                               augment_rng=torch.Generator().manual_seed(5),
                               process_slice=lambda n: slice(rank * n, (rank + 1) * n))

    whole = GanStep.sample_d_augment(process(0, 1), 8, 64)
    halves = [GanStep.sample_d_augment(process(rank, 2), 4, 64) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)
