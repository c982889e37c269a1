"""How a training process runs: its Accelerator (devices, process group, precision) and the speed settings
of the ``runtime`` config section, none of which changes the parameters or the recipe.

This is the one module that creates an ``Accelerator``; the trainer uses the one it gets.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from torch.nn.utils import parametrize
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DataLoaderConfiguration, InitProcessGroupKwargs

from ..config import Config, RuntimeConfig
from ..errors import ConfigError
from .host_memory import keep_freed_host_memory


def make_accelerator(cfg: Config, tracker_dir: Optional[Path] = None) -> Accelerator:
    """One Accelerator per process, after the process-wide settings (threads, host memory, determinism); its
    trackers (``log.tracker``) write under ``tracker_dir``."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision='fp16' needs a CUDA GPU, and none is visible: use 'bf16' or 'no' on CPU")
    if cfg.runtime.num_threads is not None:
        torch.set_num_threads(cfg.runtime.num_threads)
    if cfg.runtime.keep_host_memory:
        keep_freed_host_memory()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.runtime.tf32
    handlers = [  # a process that waits for a dead peer gives up after this long instead of hanging forever
        InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))]
    if cuda and cfg.runtime.cuda_graphs:  # autocast's cache of cast weights cannot outlive a graph capture
        handlers.append(AutocastKwargs(cache_enabled=False))
    tracker = None if cfg.log.tracker == "none" else cfg.log.tracker
    accelerator = Accelerator(
        log_with=tracker,
        project_dir=None if tracker_dir is None else str(tracker_dir),
        # Without a GPU, processes started by a launcher form a gloo group (Accelerate's MULTI_CPU).
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.precision,
        # Each loader batch is the global batch; every process takes its slice of it, so an iteration
        # sees the same images whatever the number of processes.
        # On a GPU, index batches come from pinned memory without the host waiting (DataLoader pin_memory).
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=cuda),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )
    return accelerator


def graph_capture(cfg: Config, device: torch.device, num_processes: int) -> tuple[bool, Optional[str]]:
    """Whether this run replays its phases as CUDA graphs, and, when ``runtime.cuda_graphs`` asks for them on a GPU
    but something rules them out, why (for the log)."""
    if device.type != "cuda" or not cfg.runtime.cuda_graphs:
        return False, None
    blockers = [reason for blocked, reason in (
        (cfg.train.precision == "fp16", "train.precision=fp16 (its loss scaler checks every step on the host)"),
        (cfg.train.nonfinite == "skip", "train.nonfinite=skip (it checks every loss on the host)"),
        (cfg.train.detect_anomaly, "train.detect_anomaly=true"),
        (num_processes > 1, f"{num_processes} processes (capturing DDP's all-reduce is not supported yet)"),
    ) if blocked]
    if blockers:
        return False, "runtime.cuda_graphs: phases run eagerly because of " + "; ".join(blockers)
    return True, None


def optimizer_options(runtime: RuntimeConfig, device: torch.device, capture: bool) -> dict:
    """Keyword arguments of ``optim.make_optimizers`` for this device: fused Adam on CUDA, capturable for graphs,
    else ``runtime.foreach``."""
    return {"fused": device.type == "cuda" and runtime.fused_adam, "foreach": runtime.foreach, "capturable": capture,
            "device": device}


def precision_warning(cfg: Config) -> Optional[str]:
    """What to warn about when the launcher asked for another mixed precision than ``train.precision`` (which wins)."""
    launcher = launcher_mixed_precision()
    if launcher is None or launcher == cfg.train.precision:
        return None
    return (f"the launcher asks for mixed precision {launcher!r} (accelerate launch --mixed_precision or an accelerate "
            f"config file), the config for train.precision={cfg.train.precision!r}: using {cfg.train.precision!r}; "
            f"set train.precision={launcher} to follow the launcher")


def launcher_mixed_precision() -> Optional[str]:
    """The mixed precision ``accelerate launch`` asked for (its flag or config file), when it asked for one.

    The launcher passes "no" both when told so and when told nothing, so only fp16/bf16 count as asking.
    """
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    return value if value in ("fp16", "bf16", "fp8") else None


class MaskDropout(torch.nn.Dropout):
    """Dropout drawn as ``rand_like(x) >= p``: the same distribution as ``nn.Dropout``, about twice as
    fast on CPU (PyTorch's CPU ``bernoulli_`` is slow), but other random masks than PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # One float mask holding 0 or 1/(1-p), built in place: no bool tensor, no conversion copy.
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))


def use_mask_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every ``nn.Dropout`` inside ``module`` for ``MaskDropout`` (no parameters: the state_dict is unchanged)."""
    for name, child in module.named_children():
        if type(child) is torch.nn.Dropout:
            setattr(module, name, MaskDropout(child.p))
        else:
            use_mask_dropout(child)
    return module


def memory_format(runtime: RuntimeConfig) -> torch.memory_format:
    return torch.channels_last if runtime.channels_last else torch.contiguous_format


def prepare_networks(generator: torch.nn.Module, discriminator: torch.nn.Module, runtime: RuntimeConfig,
                     device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The runtime settings applied to freshly built networks: memory format, and CPU-only speed-ups."""
    layout = memory_format(runtime)
    if runtime.cpu_mask_dropout and device.type == "cpu":
        use_mask_dropout(discriminator)
    return generator.to(memory_format=layout), discriminator.to(memory_format=layout)


def compiled_forwards(generator: torch.nn.Module, discriminator: torch.nn.Module,
                      cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module, Optional[str]]:
    """The callables the training step runs the networks through: compiled where ``runtime.compile`` asks and the
    network allows it, else the networks themselves; and which network stays eager and why, for the log."""
    if not cfg.runtime.compile:
        return generator, discriminator, None
    eager = {}
    if cfg.model.classes:
        # torch 2.13's inductor (CPU) computes a conditional ResNetGenerator's gradients wrong (thousands of times
        # the eager ones, forward equal); tests/system/test_compile.py checks that this still holds before lifting it.
        eager["generator"] = "class-conditional generators compile to wrong gradients (torch 2.13 inductor)"
    if any(parametrize.is_parametrized(m) for m in discriminator.modules()):
        # Spectral normalisation's power iteration updates its vectors in place in every training forward; compiled
        # code keeps them for the backward without eager autograd's copies, so D's second forward (real, then fake)
        # breaks the first one's backward.
        eager["discriminator"] = "spectral normalisation updates its state in place during the forward pass"
    note = None
    if eager:
        note = "runtime.compile: eager " + "; ".join(f"{name} ({why})" for name, why in eager.items())
    return (generator if "generator" in eager else torch.compile(generator),
            discriminator if "discriminator" in eager else torch.compile(discriminator), note)
