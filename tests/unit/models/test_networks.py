"""Networks and losses against the seed bundle's formulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mednist_gan.config import ModelConfig
from mednist_gan.errors import ConfigError
from mednist_gan.models.losses import discriminator_loss, generator_loss, mode_seeking_penalty, r1_penalty
from mednist_gan.models.networks import ResNetDiscriminator, ResNetGenerator, build_discriminator, build_generator
from mednist_gan.runtime.accelerator import MaskDropout, use_mask_dropout


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
    bundle_d = (bce(torch.sigmoid(fake_logits), torch.zeros(64, 1))
                + bce(torch.sigmoid(real_logits), torch.ones(64, 1))) / 2
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


# ----------------------------------------------------------------------------- residual networks (model.arch=resnet)

@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("channels", [2, 8])
@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_resnet_shapes(image_size, channels, num_classes, batch):
    torch.manual_seed(0)
    G = ResNetGenerator(16, channels, image_size, num_classes)
    D = ResNetDiscriminator(channels, image_size, num_classes)
    labels = torch.randint(0, num_classes, (batch,)) if num_classes else None
    images = G(torch.randn(batch, 16), labels)
    assert images.shape == (batch, 1, image_size, image_size)
    assert images.min() >= 0 and images.max() <= 1
    assert D(images, labels).shape == (batch, 1)
    stages = {32: 3, 64: 4}[image_size]
    assert len(G.blocks) == len(D.blocks) == stages


def test_resnet_generator_is_batch_independent_and_conditioned():
    """Group normalisation: an image does not depend on the rest of its batch (so 1 and N processes agree);
    with classes, the label changes the image, and the discriminator's projection changes the logit."""
    torch.manual_seed(0)
    G, D = ResNetGenerator(16, 4, 64, num_classes=3), ResNetDiscriminator(4, 64, num_classes=3)
    for module in (*G.modules(), *D.modules()):
        if isinstance(module, torch.nn.Embedding):  # zero at the start (no effect): give the labels one
            torch.nn.init.normal_(module.weight)
    z, labels = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        whole = G(z, labels)
        assert torch.allclose(whole[2:3], G(z[2:3], labels[2:3]), atol=1e-6)
        assert not torch.allclose(G(z, labels), G(z, (labels + 1) % 3), atol=1e-3)
        assert not torch.allclose(D(whole, labels), D(whole, (labels + 1) % 3), atol=1e-4)


def test_resnet_discriminator_is_spectrally_normalised_and_takes_r1():
    torch.manual_seed(0)
    D = ResNetDiscriminator(4, 64).train()
    x = torch.rand(6, 1, 64, 64, requires_grad=True)
    for _ in range(30):  # one power iteration per forward
        logits = D(x)
    for name, module in D.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            sigma = torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2)
            assert sigma == pytest.approx(1.0, rel=0.05), name
    r1_penalty(logits, x).backward()  # the double backward reaches every weight (biases of a ReLU net: zero a.e.)
    weights = [p for name, p in D.named_parameters() if name.endswith("weight.original")]
    assert len(weights) == 3 * len(D.blocks) + 1
    assert all(w.grad is not None and float(w.grad.abs().sum()) > 0 for w in weights)


def test_mode_seeking_penalty_punishes_pairs_that_end_in_one_image():
    """train.mode_seeking: one value per pair (2k, 2k+1), so that a batch's halves give the whole batch's values;
    near-copies score far above distinct images, and its gradient pushes a pair's images apart."""
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    distinct = torch.rand(8, 1, 64, 64)
    copies = distinct.clone()
    copies[1::2] = copies[0::2] + 0.001 * torch.rand(4, 1, 64, 64)
    expected = torch.stack([1 / ((distinct[i] - distinct[i + 1]).abs().mean() / (z[i] - z[i + 1]).abs().mean() + 0.01)
                            for i in range(0, 8, 2)])
    assert torch.allclose(mode_seeking_penalty(distinct, z), expected)
    assert (mode_seeking_penalty(copies, z) > 20 * mode_seeking_penalty(distinct, z)).all()
    halves = torch.cat([mode_seeking_penalty(distinct[:4], z[:4]), mode_seeking_penalty(distinct[4:], z[4:])])
    assert torch.allclose(halves, expected)
    moving = copies.clone().requires_grad_(True)
    mode_seeking_penalty(moving, z).mean().backward()
    step = copies - 0.1 * moving.grad  # one gradient step lowers the penalty by spreading each pair
    assert (mode_seeking_penalty(step, z) < mode_seeking_penalty(copies, z)).all()
    assert ((step[0::2] - step[1::2]).abs().mean() > (copies[0::2] - copies[1::2]).abs().mean())


def test_minibatch_stddev_tells_copies_from_variety_per_group():
    """model.resnet_mbstd: D's extra feature is each group's feature spread, the same for every image of a group,
    zero-ish for a group of copies; groups are consecutive images, so a process's slice computes what one process
    does; it reaches D's logits and R1's double backward."""
    from mednist_gan.models.networks import minibatch_stddev

    torch.manual_seed(0)
    features = torch.randn(8, 5)
    features[4:] = features[4]  # the second group of four: copies of one image
    std = minibatch_stddev(features, 4)
    assert std.shape == (8, 1)
    assert torch.allclose(std[:4], features[:4].std(dim=0, unbiased=False).mean().expand(4, 1), atol=1e-6)
    assert float(std[4:].max()) < 1e-3 < float(std[:4].min())
    assert torch.equal(torch.cat([minibatch_stddev(features[:4], 4), minibatch_stddev(features[4:], 4)]), std)
    assert minibatch_stddev(features[:6], 4).shape == (6, 1)  # 6 images: groups of gcd(4, 6) = 2
    D = ResNetDiscriminator(4, 64, num_classes=2, mbstd_group=4)
    assert D.linear.parametrizations.weight.original.shape == (1, 4 * 8 + 1)
    x, labels = torch.rand(8, 1, 64, 64, requires_grad=True), torch.arange(8) % 2
    logits = D(x, labels)
    assert logits.shape == (8, 1)
    r1_penalty(logits, x).backward()
    assert float(D.linear.parametrizations.weight.original.grad[0, -1].abs()) > 0
    cfg = ModelConfig(arch="resnet", resnet_d_channels=2, resnet_mbstd=4)
    assert build_discriminator(cfg).mbstd_group == 4 and "resnet_mbstd" in ModelConfig.architecture_keys()
    with pytest.raises(ConfigError, match="model.resnet_mbstd"):
        ModelConfig(arch="resnet", resnet_mbstd=1).check()


def test_minibatch_stddev_with_labels_sees_a_collapse_within_a_class():
    """A class-conditional D's statistic is each image's spread among its own class's images in its group: a
    generator that makes one image per class looks as varied as real images to the plain statistic (the classes
    differ), and like copies to this one."""
    from mednist_gan.models.networks import minibatch_stddev

    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0])
    varied = torch.randn(8, 5)
    collapsed = torch.randn(3, 5)[labels]  # one image per class
    plain = minibatch_stddev(collapsed, 8)
    by_class = minibatch_stddev(collapsed, 8, labels)
    assert float(plain.min()) > 0.3 and float(by_class.max()) < 1e-3
    std = minibatch_stddev(varied, 8, labels)
    for i in range(8):  # brute force: the spread among the images of i's class
        own = varied[labels == labels[i]]
        assert torch.allclose(std[i], own.std(dim=0, unbiased=False).mean(), atol=1e-5)
    single = torch.tensor([0, 1, 1, 1, 0, 0, 0, 0])  # image 0 is the only one of its class in the first group of 4
    assert float(minibatch_stddev(varied, 4, single)[0]) < 1e-3
    # groups are still consecutive: two slices compute what the whole batch does
    assert torch.equal(torch.cat([minibatch_stddev(varied[:4], 4, labels[:4]),
                                  minibatch_stddev(varied[4:], 4, labels[4:])]),
                       minibatch_stddev(varied, 4, labels))
    D = ResNetDiscriminator(4, 64, num_classes=3, mbstd_group=4)
    x = torch.rand(8, 1, 64, 64, requires_grad=True)
    r1_penalty(D(x, labels), x).backward()  # R1's double backward goes through it
    grad = D.linear.parametrizations.weight.original.grad[0, -1]
    assert torch.isfinite(grad) and float(grad.abs()) > 0


def test_resnet_discriminator_without_spectral_norm_is_plain_and_trains_under_r1():
    """model.resnet_d_sn=false: the same layers and shapes with plain weights (no parametrizations, so the
    state_dict keys differ and the key is an architecture key), Xavier-initialised, and R1 reaches every weight."""
    from torch.nn.utils import parametrize

    cfg = ModelConfig(arch="resnet", resnet_d_channels=4, classes=["Hand", "CXR"], resnet_d_sn=False)
    plain, normed = build_discriminator(cfg), build_discriminator(dataclasses.replace(cfg, resnet_d_sn=True))
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in normed.parameters())
    assert sorted(k.replace(".parametrizations.weight.original", ".weight") for k in normed.state_dict()
                  if not k.endswith("_u") and not k.endswith("_v")) == sorted(plain.state_dict())
    assert "resnet_d_sn" in ModelConfig.architecture_keys()
    conv = plain.blocks[1].conv1.weight.detach()
    bound = (6 / (conv.shape[1] * 9 + conv.shape[0] * 9)) ** 0.5  # Xavier-uniform's bound
    assert float(conv.abs().max()) <= bound and float(conv.abs().max()) > 0.9 * bound
    x, labels = torch.rand(4, 1, 64, 64, requires_grad=True), torch.tensor([0, 1, 0, 1])
    logits = plain(x, labels)
    assert logits.shape == (4, 1)
    r1_penalty(logits, x).backward()
    assert all(float(m.weight.grad.abs().sum()) > 0 for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_resnet_exports_round_trip(tmp_path):
    from mednist_gan.generator.export import export_generator
    from mednist_gan.generator.loader import open_generator

    cfg = ModelConfig(arch="resnet", latent_size=16, resnet_g_channels=2, resnet_d_channels=2)
    torch.manual_seed(0)
    G = build_generator(cfg).eval()
    out = export_generator(G, cfg, tmp_path / "export", {"config": {"model": dataclasses.asdict(cfg)}})
    z = torch.randn(3, 16)
    with torch.no_grad():
        expected = G(z)
        assert torch.equal(open_generator(out / "model.pt").network(z), expected)  # architecture from export.json
        for name in ("mednist_gan.ts", "mednist_gan.pt2"):
            opened = open_generator(out / name)
            net, latent_size = opened.network, opened.latent_size
            assert latent_size == 16 and torch.allclose(net(z), expected, atol=1e-6), name
    assert (out / "bundle" / "models" / "model.ts").is_file()  # a MONAI bundle around the TorchScript file
    assert "torch.jit.load" in (out / "bundle" / "configs" / "inference.json").read_text()


def test_resnet_config_checks():
    with pytest.raises(ConfigError, match=r"model.image_shape=\[1, 48, 48\] is not allowed"):
        ModelConfig(arch="resnet", image_shape=[1, 48, 48]).check()
    with pytest.raises(ConfigError, match="model.resnet_g_channels=0"):
        ModelConfig(arch="resnet", resnet_g_channels=0).check()
    ModelConfig(arch="resnet", image_shape=[1, 32, 32]).check()


@pytest.mark.parametrize("name, arch", [("wide.yaml", "monai"), ("resnet.yaml", "resnet")])
def test_model_size_presets_build_larger_networks(name, arch):
    """Model size is a config choice: the presets' networks are several times the bundle's and make 64x64 images."""
    from mednist_gan.config import load_config

    from helpers import CONFIGS

    cfg = load_config(CONFIGS / name).model
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert cfg.arch == arch
    assert sum(p.numel() for p in G.parameters()) > 5 * 314_892
    assert sum(p.numel() for p in D.parameters()) > 5 * 136_727
    with torch.no_grad():
        assert D(G(torch.randn(2, cfg.latent_size))).shape == (2, 1)
