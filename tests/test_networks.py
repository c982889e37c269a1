"""Networks and losses against the seed bundle's formulation."""

from __future__ import annotations

import pytest
import torch

from mednist_gan.config import ModelConfig
from mednist_gan.losses import discriminator_loss, generator_loss
from mednist_gan.networks import MaskDropout, PhaseSplitConv2d, build_discriminator, build_generator


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
    masked = build_discriminator(ModelConfig(), mask_dropout=True)
    assert list(plain.state_dict()) == list(masked.state_dict())
    assert any(isinstance(m, MaskDropout) for m in masked.modules())
    layer = MaskDropout(0.25).train()
    x = torch.ones(200_000)
    y = layer(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("in_channels,kernel", [(1, 5), (8, 5), (3, 3)])
def test_phase_split_conv_equals_conv2d_through_double_backward(in_channels, kernel):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(in_channels, 6, kernel, 2, kernel // 2).double()
    fast = PhaseSplitConv2d(in_channels, 6, kernel, 2, kernel // 2).double()
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(3, in_channels, 12, 12, dtype=torch.double)
    grads = []
    for conv in (plain, fast):
        xi = x.clone().requires_grad_(True)
        out = conv(xi)
        # first order (as in every GAN step) and second order (R1 differentiates the input gradient)
        (grad_x,) = torch.autograd.grad((out * out.detach().cos()).sum(), xi, create_graph=True)
        (grad_x.pow(2).sum() + out.sum()).backward()
        grads.append((out.detach(), grad_x.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_phase_split_keeps_the_discriminator_state_dict_and_odd_sizes_take_the_plain_path():
    plain = build_discriminator(ModelConfig())
    fast = build_discriminator(ModelConfig(), init=False, phase_split=True)
    fast.load_state_dict(plain.state_dict(), strict=True)
    swapped = [m for m in fast.modules() if isinstance(m, PhaseSplitConv2d)]
    assert len(swapped) == 4  # layers 0 and 1 (1 and 8 input channels): main and residual convolution each
    x = torch.rand(2, 8, 15, 15)  # odd size: PyTorch's own convolution
    torch.testing.assert_close(swapped[-1](x), torch.nn.functional.conv2d(x, swapped[-1].weight, swapped[-1].bias, 2, 2))
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(images), plain.eval()(images))


def test_phase_split_conv_under_bf16_autocast_matches_conv2d():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 16, 5, 2, 2)
    fast = PhaseSplitConv2d(8, 16, 5, 2, 2)
    fast.load_state_dict(plain.state_dict())
    x = torch.rand(4, 8, 16, 16)
    results = []
    for conv in (plain, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(xi)
        out.float().square().sum().backward()
        results.append((out.dtype, out.float(), xi.grad, conv.weight.grad, conv.bias.grad))
    assert results[0][0] == results[1][0] == torch.bfloat16
    for a, b in zip(results[0][1:], results[1][1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * a.abs().max().item())
