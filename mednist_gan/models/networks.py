"""The networks a config names (``model.arch``): MONAI's Generator and Discriminator, initialised as the seed
bundle does, or a residual generator and a spectrally normalised residual discriminator with a projection
head (SNGAN/BigGAN-style, for 64x64 images, built here because MONAI has none).

Both kinds map latents (N, L) to images (N, 1, H, W) in [0, 1] and images to logits (N, 1).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from monai.networks import normal_init
from monai.networks.nets import Discriminator, Generator
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..config import ModelConfig

# Widths of the residual networks' stages, as multiples of model.resnet_g_channels / resnet_d_channels.
# The residual networks' widths, multiples of model.resnet_*_channels, by resolution: G's from 4x4 up (one per
# doubling and the start), D's from the image down to 4x4 (BigGAN's tables: the extra stages of 128 and 256 keep the
# widest width near 4x4). Up to 64 each size is the tail (G) or head (D) of the 64 table.
G_WIDTHS = {128: (16, 16, 8, 4, 2, 1), 256: (16, 16, 8, 8, 4, 2, 1)}
D_WIDTHS = {128: (1, 2, 4, 8, 16), 256: (1, 2, 4, 8, 8, 16)}
G_WIDTHS_64, D_WIDTHS_64 = (16, 8, 4, 2, 1), (1, 2, 4, 8)  # 4x4 -> ... -> 64x64; 64x64 -> ... -> 8x8 -> 4x4


def generator_widths(image_size: int) -> tuple[int, ...]:
    return G_WIDTHS.get(image_size) or G_WIDTHS_64[len(G_WIDTHS_64) - 1 - _stages(image_size):]


def discriminator_widths(image_size: int) -> tuple[int, ...]:
    return D_WIDTHS.get(image_size) or D_WIDTHS_64[:_stages(image_size)]


def build_generator(cfg: ModelConfig, init: bool = True) -> nn.Module:
    """The config's generator; MONAI's with the bundle's output Sigmoid as ``conv.activation`` (no parameters,
    same keys)."""
    if cfg.arch == "resnet":
        return ResNetGenerator(cfg.latent_size, cfg.resnet_g_channels, cfg.image_shape[-1], len(cfg.classes), init=init)
    net = Generator(
        latent_shape=cfg.latent_size,
        start_shape=list(cfg.start_shape),
        channels=list(cfg.g_channels),
        strides=list(cfg.g_strides),
    )
    if init:
        net.apply(normal_init)
    net.conv.add_module("activation", torch.nn.Sigmoid())
    return net


def build_discriminator(cfg: ModelConfig, init: bool = True) -> nn.Module:
    """The config's discriminator, returning logits (MONAI's with ``last_act=None``) so the losses are autocast-safe."""
    if cfg.arch == "resnet":
        return ResNetDiscriminator(cfg.resnet_d_channels, cfg.image_shape[-1], len(cfg.classes), init=init,
                                   mbstd_group=cfg.resnet_mbstd, spectral=cfg.resnet_d_sn)
    net = Discriminator(
        in_shape=list(cfg.image_shape),
        channels=list(cfg.d_channels),
        strides=list(cfg.d_strides),
        num_res_units=cfg.d_num_res_units,
        kernel_size=cfg.d_kernel_size,
        dropout=cfg.d_dropout,
        last_act=None,
    )
    if init:
        net.apply(normal_init)
    return net


def generator_copy(cfg: ModelConfig, generator: torch.nn.Module) -> nn.Module:
    """A fresh CPU generator holding ``generator``'s weights (e.g. to export while training goes on)."""
    copy = build_generator(cfg, init=False)
    copy.load_state_dict(generator.state_dict())
    return copy


# ----------------------------------------------------------------------------- residual networks

def _stages(image_size: int) -> int:
    """Resolution doublings between 4x4 and ``image_size`` (a power of two from 8 on; ModelConfig checks it)."""
    return int(math.log2(image_size // 4))


class ConditionalNorm(nn.Module):
    """Group normalisation (batch-independent, so one and several processes compute the same) with a learned
    affine, per class when ``num_classes`` > 0 (the conditional-BatchNorm idea without batch statistics)."""

    def __init__(self, channels: int, num_classes: int = 0, groups: int = 16):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(groups, channels), channels, affine=num_classes == 0)
        self.embed = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)  # gain 1 + 0, bias 0: the plain normalisation at the start

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.norm(x)
        if self.embed is not None and labels is not None:
            gain, bias = self.embed(labels).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
            h = h * (1 + gain) + bias
        return h


class GeneratorBlock(nn.Module):
    """norm-ReLU-upsample-conv3x3-norm-ReLU-conv3x3, plus an upsampled 1x1 shortcut (BigGAN's G block)."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int = 0):
        super().__init__()
        self.norm1 = ConditionalNorm(in_channels, num_classes)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ConditionalNorm(out_channels, num_classes)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.interpolate(F.relu(self.norm1(x, labels)), scale_factor=2.0, mode="nearest")
        h = self.conv2(F.relu(self.norm2(self.conv1(h), labels)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResNetGenerator(nn.Module):
    """Latents (N, L) [and class labels (N,)] -> images (N, 1, S, S) in [0, 1]: a linear layer to 4x4, then one
    residual up-sampling block per doubling, widths ``channels`` x ``generator_widths(S)`` ((16, 8, 4, 2, 1) at 64)."""

    def __init__(self, latent_size: int = 128, channels: int = 32, image_size: int = 64, num_classes: int = 0,
                 init: bool = True):
        super().__init__()
        widths = [channels * m for m in generator_widths(image_size)]
        self.latent_shape = [latent_size]  # as MONAI's Generator says it (generate reads it)
        self.num_classes = num_classes  # > 0: called as G(latents, labels)
        self.start_channels = widths[0]
        self.linear = nn.Linear(latent_size, widths[0] * 16)
        self.blocks = nn.ModuleList([GeneratorBlock(a, b, num_classes) for a, b in zip(widths, widths[1:])])
        self.norm = ConditionalNorm(widths[-1], num_classes)
        self.out = nn.Conv2d(widths[-1], 1, 3, padding=1)
        if init:
            _xavier_init(self)

    def forward(self, latents: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.linear(latents).view(latents.shape[0], self.start_channels, 4, 4)
        for block in self.blocks:
            h = block(h, labels)
        return torch.sigmoid(self.out(F.relu(self.norm(h, labels))))


def _maybe_sn(module: nn.Module, spectral: bool) -> nn.Module:
    return spectral_norm(module) if spectral else module


class DiscriminatorBlock(nn.Module):
    """(ReLU-)conv3x3-ReLU-conv3x3-avgpool plus a 1x1 shortcut, spectrally normalised unless ``spectral`` is False
    (SNGAN's D block); the first block takes the image itself: no ReLU before it, and its shortcut pools before the
    convolution."""

    def __init__(self, in_channels: int, out_channels: int, first: bool = False, spectral: bool = True):
        super().__init__()
        self.first = first
        self.conv1 = _maybe_sn(nn.Conv2d(in_channels, out_channels, 3, padding=1), spectral)
        self.conv2 = _maybe_sn(nn.Conv2d(out_channels, out_channels, 3, padding=1), spectral)
        self.shortcut = _maybe_sn(nn.Conv2d(in_channels, out_channels, 1), spectral)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(h))), 2)
        shortcut = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
        return h + shortcut


class ResNetDiscriminator(nn.Module):
    """Images (N, 1, S, S) [and class labels (N,)] -> logits (N, 1): residual down-sampling blocks to 4x4, widths
    ``channels`` x ``discriminator_widths(S)`` ((1, 2, 4, 8) at 64), ReLU, a sum over positions, a linear layer,
    and with ``num_classes`` > 0 the projection <embed(label), features> (Miyato & Koyama 2018); every layer
    spectrally normalised, unless ``spectral`` is False (then the gradient penalty, ``train.r1_gamma``, is D's only
    constraint, as in StyleGAN).

    ``mbstd_group`` > 0 appends one feature per image before the linear layer: the standard deviation of the pooled
    features across its group of that many consecutive images, averaged over the features (StyleGAN's minibatch
    standard deviation, on the pooled features), so that D can tell a batch of near-copies from real variety; with
    class labels, across the images of its own class in its group (see ``minibatch_stddev``). Groups are consecutive
    images, so a process's slice of a batch (a multiple of the group size) computes what one process does."""

    def __init__(self, channels: int = 32, image_size: int = 64, num_classes: int = 0, init: bool = True,
                 mbstd_group: int = 0, spectral: bool = True):
        super().__init__()
        widths = [1] + [channels * m for m in discriminator_widths(image_size)]
        self.mbstd_group = mbstd_group
        self.blocks = nn.Sequential(*[DiscriminatorBlock(a, b, first=i == 0, spectral=spectral)
                                      for i, (a, b) in enumerate(zip(widths, widths[1:]))])
        features = widths[-1] + (1 if mbstd_group else 0)
        self.linear = _maybe_sn(nn.Linear(features, 1), spectral)
        self.embed = _maybe_sn(nn.Embedding(num_classes, features), spectral) if num_classes else None
        if init:
            _xavier_init(self)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = F.relu(self.blocks(images)).sum(dim=(2, 3))
        if self.mbstd_group:
            h = torch.cat([h, minibatch_stddev(h, self.mbstd_group, labels if self.embed is not None else None)], dim=1)
        out = self.linear(h)
        if self.embed is not None and labels is not None:
            out = out + (self.embed(labels) * h).sum(dim=1, keepdim=True)
        return out


def minibatch_stddev(features: torch.Tensor, group: int, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, C) -> (N, 1): for each image, the standard deviation of the features across its group of ``group``
    consecutive images (fewer where N is not a multiple: the largest common divisor), averaged over the features.

    With ``labels`` (N,), across the images of the group that share its label (0 for the only one of its class):
    in a batch of mixed classes the spread between classes would drown a generator's collapse within a class
    (measured in docs/experiments/quality-history.md), so a class-conditional D needs groups that hold several
    images of a class (``model.resnet_mbstd: 32`` in configs/conditional.yaml)."""
    n, c = features.shape
    group = math.gcd(group, n)
    grouped = features.float().view(n // group, group, c)
    if labels is None:
        std = (grouped.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # (N / group,)
        return std.repeat_interleave(group).view(n, 1).to(features.dtype)
    labels = labels.view(n // group, group)
    same = (labels[:, :, None] == labels[:, None, :]).float()  # (N / group, group, group): image i, image j
    count = same.sum(dim=2, keepdim=True)  # images of each one's class in its group, itself included
    mean = same @ grouped / count  # each image's class mean within its group
    spread = (grouped[:, None, :, :] - mean[:, :, None, :]).square()  # [b, i, j]: image j's distance to i's class mean
    var = (same[..., None] * spread).sum(dim=2) / count
    return (var + 1e-8).sqrt().mean(dim=2).reshape(n, 1).to(features.dtype)


def _xavier_init(net: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for convolutions and linear layers (SNGAN's initialisation)."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
            nn.init.xavier_uniform_(weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
