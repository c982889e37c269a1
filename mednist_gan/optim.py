"""The two Adam optimizers and their learning-rate schedule (warm-up, then none/linear/cosine decay)."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def make_optimizers(generator: torch.nn.Module, discriminator: torch.nn.Module,
                    cfg: OptimConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    betas = tuple(cfg.betas)
    return (torch.optim.Adam(generator.parameters(), lr=cfg.g_lr, betas=betas, foreach=cfg.foreach),
            torch.optim.Adam(discriminator.parameters(), lr=cfg.d_lr, betas=betas, foreach=cfg.foreach))


def make_schedulers(optimizers, cfg: OptimConfig, total_steps: int) -> list:
    """One ``LambdaLR`` per optimizer when the config schedules the learning rate, else none."""
    if not cfg.scheduled:
        return []
    factor = lr_factor(cfg, total_steps)
    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]


def lr_factor(optim: OptimConfig, total_steps: int):
    """Learning-rate multiplier per iteration: linear warm-up, then none/linear/cosine decay to final_lr_ratio."""
    warmup, final = optim.warmup_steps, optim.final_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.decay == "none":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        if optim.decay == "linear":
            return 1.0 - (1.0 - final) * progress
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
