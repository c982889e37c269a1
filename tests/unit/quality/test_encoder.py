"""The self-supervised encoder: its views, its loss, reproducible training, and the shipped weights' card."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mednist_gan.quality.classifier import load_split
from mednist_gan.quality.encoder import (CARD_JSON, WEIGHTS_FILE, MedNISTEncoder, gaussian_blur, load_encoder, nt_xent,
                                         random_views, view_retrieval)
from mednist_gan.quality.evaluate import load_real_images
from mednist_gan.quality.scores import blurred

from helpers import run_cli


def test_views_are_seeded_in_range_and_never_flipped(mednist_root):
    hands = load_real_images(mednist_root / "Hand")[:64]
    a = random_views(hands, torch.Generator().manual_seed(1))
    b = random_views(hands, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == hands.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, random_views(hands, torch.Generator().manual_seed(2)))
    # a view stays closer to its own image than to the image flipped: no flips among the augmentations
    to_own = (a - hands).abs().mean(dim=(1, 2, 3))
    to_flipped = (a - hands.flip(-1)).abs().mean(dim=(1, 2, 3))
    assert (to_own < to_flipped).float().mean() > 0.9


def test_per_image_blur_matches_monais_gaussian_smooth_inside_the_image():
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = gaussian_blur(x, torch.tensor([0.8, 1.0, 1.5]))
    for i, sigma in enumerate((0.8, 1.0, 1.5)):
        monai = blurred(x[i:i + 1], sigma)
        inside = (ours[i, :, 6:-6, 6:-6] - monai[0, :, 6:-6, 6:-6]).abs()  # edges differ: reflected vs zeros
        assert inside.max() < 0.03 and inside.mean() < 0.01  # white noise, sampled kernel vs MONAI's erf-integrated one


def test_blurred_keeps_brightness():
    """The project's first sanity table passed (N, 1, H, W) straight to GaussianSmooth, which then blurred a 3-D
    image with zero padding along the batch axis: 'sigma 1.5' kept 26% of the brightness."""
    x = torch.full((4, 1, 64, 64), 0.5)
    assert blurred(x, 1.5)[:, :, 8:-8, 8:-8].mean() == pytest.approx(0.5, abs=1e-4)


def test_nt_xent_prefers_matching_views():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=g)
    matching = nt_xent(a, a + 0.01 * torch.randn(32, 16, generator=g), 0.2)
    unrelated = nt_xent(a, torch.randn(32, 16, generator=g), 0.2)
    assert matching < 1.0 and unrelated > 3.5  # log(63) = 4.1: no better than chance among 63 candidates


def test_shipped_encoder_matches_its_card_and_finds_its_views(mednist_root):
    card = json.loads(CARD_JSON.read_text())
    assert hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest() == card["sha256"]
    assert card["command"].startswith("mednist-gan train-encoder --data-root ")
    assert card["results"]["train_images"] > 50_000  # all six classes of the complete MedNIST set
    net = load_encoder()
    held_out = load_split(mednist_root, 0.1, card["training"]["seed"])["test"][0]
    assert net.features(held_out[:8]).shape == (8, MedNISTEncoder.feature_size)
    # an untrained encoder finds a view's partner far less often than the trained one
    assert view_retrieval(net, held_out, 0) > 2 * view_retrieval(MedNISTEncoder().eval(), held_out, 0)


def test_train_encoder_refuses_a_folder_without_the_classes(tmp_path):
    result = run_cli("train-encoder", "--data-root", str(tmp_path), "--out", str(tmp_path / "e.pt"))
    assert result.returncode == 2 and "no AbdomenCT/ folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.pt").exists()
