"""The two Adam optimizers and their learning-rate schedule (warm-up, then none/linear/cosine decay)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import OptimConfig


def make_optimizers(generator: torch.nn.Module, discriminator: torch.nn.Module, cfg: OptimConfig,
                    fused: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                    device: Optional[torch.device] = None) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for each network: ``fused``, or else ``foreach`` (None: PyTorch's choice). ``capturable`` (for CUDA
    graphs) keeps the step counts and learning rates as tensors on ``device``, so that a replayed update uses the
    schedule's current learning rate."""
    betas = tuple(cfg.betas)
    options = {"fused": True} if fused else {"foreach": foreach}

    def adam(net: torch.nn.Module, lr: float) -> torch.optim.Adam:
        rate = torch.tensor(lr, device=device) if capturable else lr
        return torch.optim.Adam(net.parameters(), lr=rate, betas=betas, capturable=capturable, **options)

    return adam(generator, cfg.g_lr), adam(discriminator, cfg.d_lr)


# How an optimizer computes its update, chosen per run (runtime.optimizer_options), not what the update is.
IMPLEMENTATION_OPTIONS = ("capturable", "fused", "foreach")


def keep_run_options(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Undo what ``load_state_dict`` should not carry over from the run that saved the checkpoint.

    It puts back every param-group entry the checkpoint holds: this run's implementation choices (a checkpoint of
    an eager or CPU run says capturable=False, of a GPU run fused=True) come back from the optimizer's construction,
    and a capturable optimizer's learning rates become tensors on ``device`` again (saved as floats by an eager run,
    or on the device that saved them): a CUDA graph reads that tensor at every replay, where a float would stay the
    value it was captured with.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper, or a plain optimizer
    for group in inner.param_groups:
        for key in IMPLEMENTATION_OPTIONS:
            if key in inner.defaults:
                group[key] = inner.defaults[key]
        if group.get("capturable") and not (isinstance(group["lr"], torch.Tensor) and group["lr"].device == device):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


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
