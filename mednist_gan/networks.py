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


def build_discriminator(cfg: ModelConfig, init: bool = True) -> Discriminator:
    """The bundle's discriminator, returning logits (``last_act=None``) so the losses are autocast-safe."""
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


def generator_copy(cfg: ModelConfig, generator: torch.nn.Module) -> Generator:
    """A fresh CPU generator holding ``generator``'s weights (e.g. to export while training goes on)."""
    copy = build_generator(cfg, init=False)
    copy.load_state_dict(generator.state_dict())
    return copy
