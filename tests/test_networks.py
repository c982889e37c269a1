"""Networks and losses against the seed bundle's formulation."""

from __future__ import annotations

import pytest
import torch

from mednist_gan.config import ModelConfig
from mednist_gan.losses import discriminator_loss, generator_loss
from mednist_gan.networks import build_discriminator, build_generator
from mednist_gan.runtime import MaskDropout, use_mask_dropout


def test_seed_bundle_weights_load_strictly_into_the_generator(upstream_weights):
    generator = build_generator(ModelConfig(), init=False)
    result = generator.load_state_dict(torch.load(upstream_weights, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in generator.parameters()) == 314_892
    with torch.no_grad():
        images = generator.eval()(torch.randn(4, 64))
    assert images.shape == (4, 1, 64, 64) and images.min() >= 0 and images.max() <= 1  # the Sigmoid head


def test_discriminator_returns_logits_with_the_bundle_parameter_count():
    d = build_discriminator(ModelConfig())
    assert sum(p.numel() for p in d.parameters()) == 136_727
    with torch.no_grad():
        out = d.eval()(torch.rand(3, 1, 64, 64) * 50)
    assert out.shape == (3, 1)


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])  # beyond ~|15| fp32 sigmoid saturates and BCELoss clamps
def test_losses_equal_the_bundle_sigmoid_bce_formulation_in_fp32(scale):
    g = torch.Generator().manual_seed(0)
    real_logits = torch.randn(64, 1, generator=g) * scale
    fake_logits = torch.randn(64, 1, generator=g) * scale
    bce = torch.nn.BCELoss()
    bundle_d = (bce(torch.sigmoid(fake_logits), torch.zeros(64, 1)) + bce(torch.sigmoid(real_logits), torch.ones(64, 1))) / 2
    bundle_g = bce(torch.sigmoid(fake_logits), torch.ones(64, 1))
    assert torch.allclose(discriminator_loss(real_logits, fake_logits), bundle_d, rtol=1e-5, atol=1e-6)
    assert torch.allclose(generator_loss(fake_logits), bundle_g, rtol=1e-5, atol=1e-6)


def test_losses_are_safe_under_autocast():
    d = build_discriminator(ModelConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = discriminator_loss(d(torch.rand(4, 1, 64, 64)), d(torch.rand(4, 1, 64, 64)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_mask_dropout_keeps_state_dict_and_dropout_statistics():
    plain = build_discriminator(ModelConfig())
    masked = use_mask_dropout(build_discriminator(ModelConfig()))
    assert list(plain.state_dict()) == list(masked.state_dict())
    assert any(isinstance(m, MaskDropout) for m in masked.modules())
    layer = MaskDropout(0.25).train()
    x = torch.ones(200_000)
    y = layer(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(layer.eval()(x), x)
