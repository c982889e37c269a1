"""The full training state in a checkpoint: which checkpoint to resume from, writing one, and reading it back.

A checkpoint folder holds Accelerate's files (networks, optimizers, schedulers, the loader's sampler, each
process's RNG states), the step's shared random streams (``latent_rng.pt``, ``augment_rng.pt``), the generator's
moving average (``ema.safetensors``) and ``checkpoint.json`` (the loop's counters, the config, the number of
processes that wrote it). ``mednist_gan.checkpoint`` makes a folder appear atomically and finds the newest intact
one; this module decides what goes into it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt
from ..checkpoint import TrainState
from ..config import Config, ModelConfig
from ..errors import CheckpointError, ConfigError, TrainingError, first_line
from ..files import PROVENANCE_FILE, write_atomic
from .optim import keep_run_options
from .step import GanStep
from .stopping import crash_point, write_failure

LATENT_RNG_FILE, AUGMENT_RNG_FILE = "latent_rng.pt", "augment_rng.pt"  # shared streams, saved by the main process

Damaged = list[tuple[Path, CheckpointError]]


def save_checkpoint(accelerator: Accelerator, cfg: Config, state: TrainState, gan_step: GanStep,
                    git_revision: Optional[str], log: logging.Logger) -> Path:
    """Save the full state; it becomes the newest checkpoint only once complete on every process."""
    acc, run_dir, step = accelerator, cfg.run_path, state.step
    tmp = ckpt.temporary_dir(run_dir, step)
    final = ckpt.checkpoints_dir(run_dir) / ckpt.step_dir_name(step)
    try:
        if acc.is_main_process:
            ckpt.begin_save(run_dir, step)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            torch.save(gan_step.latent_rng.get_state(), tmp / LATENT_RNG_FILE)
            torch.save(gan_step.augment_rng.get_state(), tmp / AUGMENT_RNG_FILE)
            if gan_step.ema is not None:
                weights = {k: v.detach().cpu().contiguous() for k, v in gan_step.ema.state_dict().items()}
                save_file(weights, tmp / ckpt.EMA_FILE)
        crash_point("save", step)
        acc.wait_for_everyone()
        adaptive = {} if gan_step.ada is None else gan_step.ada.state(acc)  # every process: a collective
        if acc.is_main_process:
            meta = {"state": {**asdict(state), **adaptive}, "num_processes": acc.num_processes,
                    "config": cfg.to_dict(), "git_revision": git_revision}
            final = ckpt.publish(run_dir, tmp, step, meta, cfg.checkpoint.keep)
            log.info("checkpoint saved: %s", final)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
        reason = write_failure(exc, run_dir)  # before cleaning up frees the space again
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = ckpt.find_latest(run_dir)
        raise TrainingError(f"could not write checkpoint {final} ({reason}); "
                            f"the newest complete checkpoint is still {previous}") from exc
    acc.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, cfg: Config, path: Path, gan_step: GanStep,
                    log: logging.Logger) -> tuple[TrainState, Optional[int]]:
    """Restore the full training state from ``path`` (verified by ``resume_choice``); returns the loop's counters
    and the number of processes that wrote the checkpoint."""
    meta = ckpt.read_meta(path)
    ckpt.verify_safe(path)
    check_architecture(meta.get("config", {}).get("model", {}), cfg.model, str(path))
    if gan_step.ema is not None and not (path / ckpt.EMA_FILE).is_file():
        raise CheckpointError(f"{path}: has no {ckpt.EMA_FILE}, but the config sets train.ema_decay: "
                              "resume with train.ema_decay=null, or start a new run")
    changed = config_changes(meta.get("config", {}), cfg)
    if changed:
        log.info("%s: resuming with config keys changed since it was written: %s", path, "; ".join(changed))
    try:
        accelerator.load_state(str(path))
    except RuntimeError as exc:  # shape/key mismatch from load_state_dict
        raise CheckpointError(f"{path}: does not fit these networks: {first_line(exc)}") from None
    for optimizer in (gan_step.opt_g, gan_step.opt_d):
        keep_run_options(optimizer, accelerator.device)
    try:
        gan_step.latent_rng.set_state(torch.load(path / LATENT_RNG_FILE, weights_only=True))
        if (path / AUGMENT_RNG_FILE).is_file():
            gan_step.augment_rng.set_state(torch.load(path / AUGMENT_RNG_FILE, weights_only=True))
        elif cfg.data.augment:
            log.warning("%s: written before augmentation had its own random stream (no %s); the stream "
                        "starts again from the seed", path, AUGMENT_RNG_FILE)
        if gan_step.ema is not None:
            gan_step.ema.load_state_dict(load_file(str(path / ckpt.EMA_FILE), device=str(accelerator.device)))
    except Exception as exc:  # verify() passed, so only a checkpoint of another kind gets here
        raise CheckpointError(f"{path}: unreadable checkpoint file "
                              f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    if gan_step.ada is not None:
        gan_step.ada.restore(meta["state"])
    counters = {k: v for k, v in meta["state"].items() if k not in ckpt.ADA_STATE_KEYS}
    return TrainState(**counters), meta.get("num_processes")


def check_architecture(saved: dict, model: ModelConfig, source: str, generator_only: bool = False) -> None:
    """Weights recorded with ``saved`` (a model config section) fit the networks of ``model`` (with
    ``generator_only``, G's), or one line naming the first key that differs."""
    for key in ModelConfig.generator_keys() if generator_only else ModelConfig.architecture_keys():
        value = getattr(model, key)
        if key in saved and saved[key] != value:
            raise CheckpointError(f"{source}: trained with model.{key}={saved[key]!r}, but the config says {value!r}")


def load_initial_weights(cfg: Config, G: torch.nn.Module, D: torch.nn.Module, log: logging.Logger) -> None:
    """``train.init_from``: G's weights (a checkpoint's moving average when it has one) and, from a training
    checkpoint, D's; the optimizers and the schedule start afresh. A checkpoint of this run's own, resumed later,
    replaces them."""
    from ..generator.loader import CHECKPOINT, MODEL_FILE, WEIGHTS, is_training_checkpoint, open_generator

    what, source = f"train.init_from={cfg.train.init_from}", Path(cfg.train.init_from)
    if source.is_dir() and (source / PROVENANCE_FILE).is_file() and not is_training_checkpoint(source):
        source = source / MODEL_FILE  # an export folder: its weights, not the TorchScript file it runs by
    try:
        opened = open_generator(source)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    if opened.kind not in (CHECKPOINT, WEIGHTS):
        raise ConfigError(f"{what}: a {opened.kind} holds no weights to train on; name the export's model.pt or "
                          "folder, or a checkpoint")
    if opened.model_config is not None:
        check_architecture(asdict(opened.model_config), cfg.model, what, generator_only=opened.kind == WEIGHTS)
    try:
        G.load_state_dict(opened.network.state_dict())
        if opened.kind == CHECKPOINT:
            D.load_state_dict(load_file(str(opened.source / ckpt.D_FILE)))
    except RuntimeError as exc:  # shape/key mismatch from load_state_dict
        raise CheckpointError(f"{what}: does not fit these networks: {first_line(exc)}") from None
    log.info("starting from the weights of %s (%s)", opened.source, "G and D" if opened.kind == CHECKPOINT else "G")


# Keys that name where and how this process runs rather than what it trains.
_NOT_COMPARED = {"run_dir", "train.resume"}
_NOT_RECORDED = object()  # a key the checkpoint's version did not have


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """``key: old -> new`` for each config key whose value differs from the one a checkpoint recorded (keys it did
    not record, from other versions, are not compared)."""
    from ..config.load import yaml_value

    def recorded(key: str) -> Any:
        node = saved
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _NOT_RECORDED
            node = node[part]
        return node

    changes = []
    for key, value in cfg.flat().items():
        old = recorded(key)
        if key not in _NOT_COMPARED and old is not _NOT_RECORDED and old != value:
            changes.append(f"{key}: {yaml_value(old)} -> {yaml_value(value)}")
    return changes


def resume_choice(cfg: Config) -> tuple[Optional[Path], Damaged]:
    """The checkpoint to resume from (None: a fresh run), and the damaged newer ones that ``set_aside_damaged``
    moves once it has loaded (read-only: every process decides alike)."""
    choice, run_dir = cfg.train.resume, cfg.run_path
    if choice == "none":
        if ckpt.complete_checkpoints(run_dir):
            raise ConfigError(f"train.resume='none' but {ckpt.checkpoints_dir(run_dir)} holds checkpoints of an "
                              "earlier run: choose another run_dir, or resume with train.resume=auto")
        return None, []
    if choice == "auto":
        intact, damaged = ckpt.newest_intact(run_dir)
        if damaged and intact is None:
            raise ckpt.no_intact_error(run_dir, damaged)
        return intact, damaged
    path = Path(choice)
    if not path.is_dir():
        raise ConfigError(f"train.resume={choice!r}: no such checkpoint folder")
    ckpt.verify(path)  # the one the user named: damage is an error, not a fallback
    return path, []


def set_aside_damaged(run_dir: Path, damaged: Damaged, intact: Optional[Path], log: logging.Logger) -> None:
    """Main process: move damaged checkpoints newer than ``intact`` aside for inspection, and say so; one that
    cannot be moved stops the run (its step would be saved again beside it)."""
    for bad, reason in damaged:
        try:
            moved = ckpt.set_aside(bad)
        except OSError as exc:
            raise CheckpointError(f"cannot move damaged checkpoint {bad} aside ({exc.strerror or first_line(exc)}); "
                                  f"it is damaged ({reason}): make {bad.parent} writable, or move {bad.name} "
                                  f"elsewhere yourself, then run again to resume from {intact.name}") from None
        log.warning("checkpoint %s is damaged (%s): moved to %s for inspection; resuming from %s",
                    bad.name, reason, moved, intact)
    if damaged:
        write_atomic(ckpt.checkpoints_dir(run_dir) / ckpt.LATEST, intact.name + "\n")
