"""MONAI's Generator and Discriminator built from the config, initialised as the seed bundle does."""

from __future__ import annotations

import torch
from monai.networks import normal_init
from monai.networks.nets import Discriminator, Generator

from .config import ModelConfig


def build_generator(cfg: ModelConfig, init: bool = True) -> Generator:
    """The bundle's generator with its output Sigmoid as ``conv.activation`` (no parameters, same keys)."""
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


class MaskDropout(torch.nn.Dropout):
    """Dropout drawn as ``rand_like(x) >= p``: the same distribution as ``nn.Dropout``, about twice as
    fast on CPU (PyTorch's CPU ``bernoulli_`` is slow), but other random masks than PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # One float mask holding 0 or 1/(1-p), built in place: no bool tensor, no conversion copy.
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


def _use_mask_dropout(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is torch.nn.Dropout:
            setattr(module, name, MaskDropout(child.p))
        else:
            _use_mask_dropout(child)


def build_discriminator(cfg: ModelConfig, init: bool = True, mask_dropout: bool = False) -> Discriminator:
    """The bundle's discriminator, returning logits (``last_act=None``) so the losses are autocast-safe.

    ``mask_dropout`` swaps its dropout layers for ``MaskDropout`` (no parameters: same state_dict).
    """
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
    if mask_dropout:
        _use_mask_dropout(net)
    return net
