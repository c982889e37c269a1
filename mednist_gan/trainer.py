"""The GAN training loop; the only module that talks to Accelerate.

One iteration has the semantics of ``monai.engines.GanTrainer`` as the seed bundle uses it: for each
real batch, one fake batch from fresh latents; ``d_train_steps`` discriminator updates on those same
real and (detached) fake images; then fresh latents and one generator update (``g_train_steps``
updates, each on fresh latents). Options beyond the bundle, all off in its recipe: loss variants, an
R1 penalty, per-phase batch sizes, learning-rate warm-up/decay, an EMA of the generator's weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import Config
from .data import apply_augment, build_dataloader, load_dataset, sample_augment_params, scale_intensity
from .errors import CheckpointError, ConfigError, TrainingError, first_line
from .export import checkpoint_provenance, export_generator
from .losses import discriminator_loss, generator_loss, r1_penalty
from .networks import build_discriminator, build_generator
from .images import to_uint8_pictures
from .hostmem import keep_freed_host_memory
from .tracking import Tracking, setup_logging, tracker_dir, write_run_info

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT) if s is not None)
PREEMPTED_EXIT_CODE = 3
BEST_DIR = "best"  # the generator with the lowest FMD so far (eval.keep_best)
LATENT_RNG_FILE, AUGMENT_RNG_FILE = "latent_rng.pt", "augment_rng.pt"  # shared streams, saved by the main process
AUGMENT_SEED_OFFSET = 3_000_017
# Model keys that change the networks' parameters: a checkpoint only resumes into the same ones.
ARCHITECTURE_KEYS = ("latent_size", "start_shape", "g_channels", "g_strides", "image_shape", "d_channels",
                     "d_strides", "d_num_res_units", "d_kernel_size")


@dataclass
class TrainState:
    """Counters saved with every checkpoint (plain JSON, so loading it can never run code)."""

    step: int = 0  # iterations completed
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already consumed


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; re-running the command resumes it."""

    def __init__(self, signame: str, checkpoint: Path):
        super().__init__(f"stopped by {signame} at {checkpoint}; run the same command again to resume")
        self.checkpoint = checkpoint


def make_accelerator(cfg: Config) -> Accelerator:
    """One Accelerator per process: devices, process group and precision live here and nowhere else."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision='fp16' needs a CUDA GPU, and none is visible: use 'bf16' or 'no' on CPU")
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.keep_host_memory:
        keep_freed_host_memory()
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    tracker = None if cfg.log.tracker == "none" else cfg.log.tracker
    return Accelerator(
        log_with=tracker,
        project_dir=str(tracker_dir(cfg)),
        # Without a GPU, processes started by a launcher form a gloo group (Accelerate's MULTI_CPU).
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.precision,
        # Each loader batch is the global batch; every process takes its slice of it, so an iteration
        # sees the same images whatever the number of processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=False,
        # A process that waits for a dead peer gives up after this long instead of hanging forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
    )


class Trainer:
    def __init__(self, cfg: Config, accelerator: Optional[Accelerator] = None):
        self.cfg = cfg
        self.acc = acc = accelerator or make_accelerator(cfg)
        self.run_dir = cfg.run_path
        self.log = setup_logging(self.run_dir, acc.is_main_process)
        world = acc.num_processes
        g_batch = cfg.train.g_batch_size or cfg.train.batch_size
        for key, value in (("train.batch_size", cfg.train.batch_size), ("train.g_batch_size", g_batch)):
            if value % world:
                raise ConfigError(f"{key}={value} must be divisible by the number of processes ({world})")
        self.per_device_batch = cfg.train.batch_size // world
        self.per_device_g_batch = g_batch // world

        with acc.main_process_first():  # the main process decodes and fills the cache; the others read it
            images = load_dataset(cfg.data, cfg.model.image_shape)
        if len(images) < world:
            raise ConfigError(f"{len(images)} images cannot feed {world} processes: use fewer processes or more data")

        set_seed(cfg.train.seed)  # identical initial weights on every process
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        G = build_generator(cfg.model).to(memory_format=memory_format)
        on_cpu = acc.device.type == "cpu"
        D = build_discriminator(cfg.model, mask_dropout=cfg.model.cpu_mask_dropout and on_cpu,
                                phase_split=cfg.model.cpu_phase_split and on_cpu).to(memory_format=memory_format)
        betas = tuple(cfg.optim.betas)
        opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.g_lr, betas=betas, foreach=cfg.optim.foreach)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.d_lr, betas=betas, foreach=cfg.optim.foreach)
        loader = build_dataloader(images, cfg.train.batch_size, cfg.train.seed, pin_memory=acc.device.type == "cuda")
        self.sampler = loader.sampler
        self.num_images = len(images)
        self.total_steps = math.ceil(self.num_images / cfg.train.batch_size) * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        # The moving average starts from the initial weights; one plain module, never wrapped by Accelerate.
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = build_generator(cfg.model, init=False).to(acc.device).requires_grad_(False).eval()
            self.ema.load_state_dict(G.state_dict())
        self.schedulers = []
        if cfg.optim.scheduled:
            factor = lr_factor(cfg.optim, self.total_steps)
            self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_g, opt_d)]
        self.G, self.D, self.opt_g, self.opt_d, self.loader, *self.schedulers = acc.prepare(
            G, D, opt_g, opt_d, loader, *self.schedulers)
        self.memory_format = memory_format
        self.images = images

        # Latents and augmentation parameters come from generators shared by all processes: each
        # draws for the global batch and keeps its slice, so neither depends on the number of processes.
        self.latent_rng = torch.Generator(device=acc.device).manual_seed(cfg.train.seed)
        self.augment_rng = torch.Generator(device=acc.device).manual_seed(cfg.train.seed + AUGMENT_SEED_OFFSET)
        # Dropout uses the global RNG, different on every process.
        set_seed(cfg.train.seed, device_specific=True)
        self.state = TrainState()
        self.tracking = Tracking(cfg, acc, self.run_dir, self.log)
        # A fixed latent batch (its own seed, drawn once) makes sample grids comparable over time.
        self.fixed_latents = torch.randn(cfg.log.num_samples, cfg.model.latent_size,
                                         generator=torch.Generator().manual_seed(cfg.train.seed + 1_000_003))
        self._stop_signal: Optional[str] = None
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, metrics) not yet reduced
        self.skipped_updates = 0
        self.git_revision: Optional[str] = None
        self.meter = None  # quality metrics, built on the main process at the first evaluation
        self.best_fmd = math.inf
        if cfg.eval.keep_best and acc.is_main_process:  # only the main process evaluates and exports best/
            self.best_fmd = read_best_fmd(self.run_dir / BEST_DIR, self.log)

    # ------------------------------------------------------------------ one iteration

    def my_slice(self, n: int) -> slice:
        """This process's ``n`` samples of a global batch of ``n`` per process (Accelerate's split_batches order)."""
        return slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)

    def sample_latents(self, n: int) -> torch.Tensor:
        z = torch.randn(n * self.acc.num_processes, self.cfg.model.latent_size,
                        generator=self.latent_rng, device=self.acc.device)
        return z[self.my_slice(n)]

    def prepare_reals(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real = scale_intensity(batch)
            if self.cfg.data.augment:
                n = real.shape[0]
                params = sample_augment_params(n * self.acc.num_processes, real.device, self.augment_rng)
                real = apply_augment(real, params[self.my_slice(n)])
        return real.contiguous(memory_format=self.memory_format)

    def train_step(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration on a batch of prepared real images; returns detached per-step metrics."""
        acc, G, D, opts = self.acc, self.G, self.D, self.cfg.train

        # Discriminator phase: the fake batch needs no graph, D only ever sees it detached.
        with torch.no_grad():
            fake = G(self.sample_latents(self.per_device_batch))
        d_losses, r1_values = [], []
        for i in range(opts.d_train_steps):
            self.opt_d.zero_grad(set_to_none=True)
            d_update = self.state.step * opts.d_train_steps + i
            with_r1 = opts.r1_gamma > 0 and d_update % opts.r1_every == 0
            real_in = real.detach().requires_grad_(True) if with_r1 else real
            real_logits, fake_logits = D(real_in), D(fake)
            loss_d = total_d = discriminator_loss(real_logits, fake_logits, opts.loss)
            if with_r1:
                r1 = r1_penalty(real_logits, real_in)
                total_d = loss_d + (opts.r1_gamma / 2 * opts.r1_every) * r1
                r1_values.append(r1.detach())
            acc.backward(total_d)
            if self._skip_nonfinite(total_d, self.opt_d):
                continue
            self.opt_d.step()
            d_losses.append(loss_d.detach())

        # Generator phase: D's parameters need no gradient, and D's DDP wrapper must not wait for one.
        g_losses = []
        for j in range(opts.g_train_steps):
            self.opt_g.zero_grad(set_to_none=True)
            with frozen(D), acc.no_sync(D):
                loss_g = generator_loss(D(G(self.sample_latents(self.per_device_g_batch))), opts.loss)
            acc.backward(loss_g)
            if not self._skip_nonfinite(loss_g, self.opt_g):
                self.opt_g.step()
                self.update_ema(self.state.step * opts.g_train_steps + j)
            g_losses.append(loss_g.detach())
        self.lr_used = (self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"])
        for scheduler in self.schedulers:
            scheduler.step()

        metrics = {
            "loss_d": torch.stack(d_losses).mean() if d_losses else loss_d.detach(),
            "loss_g": torch.stack(g_losses).mean(),
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }
        if opts.r1_gamma > 0:  # NaN on iterations without an R1 update would poison the average: 0 there
            metrics["r1"] = torch.stack(r1_values).mean() if r1_values else torch.zeros((), device=acc.device)
        return metrics

    @torch.no_grad()
    def update_ema(self, t: int) -> None:
        """ema = decay * ema + (1 - decay) * weights after the t-th generator update (t from 0); buffers are copied."""
        if self.ema is None:
            return
        decay = self.cfg.train.ema_decay
        if self.cfg.train.ema_warmup:
            decay = min(decay, (1 + t) / (10 + t))
        source = self.acc.unwrap_model(self.G)
        torch._foreach_lerp_(list(self.ema.parameters()), list(source.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.ema.buffers(), source.buffers()):
            mine.copy_(theirs)

    def output_generator(self) -> torch.nn.Module:
        """The generator that samples, evaluation and exports use: the moving average when enabled."""
        return self.ema if self.ema is not None else self.acc.unwrap_model(self.G)

    def _skip_nonfinite(self, loss: torch.Tensor, optimizer) -> bool:
        """Under ``train.nonfinite=skip``: drop an update whose loss is NaN/Inf on any process (one sync)."""
        if self.cfg.train.nonfinite != "skip":
            return False
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if self.acc.reduce(bad, reduction="sum").item() == 0:
            return False
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.log.warning("step %d: non-finite loss, update skipped (%d so far)", self.state.step + 1,
                         self.skipped_updates)
        return True

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Save the full state; it becomes the newest checkpoint only once complete on every process."""
        self._reduce_pending(consume=False)  # never save weights that a non-finite loss has touched
        acc, step = self.acc, self.state.step
        tmp = ckpt.temporary_dir(self.run_dir, step)
        final = ckpt.checkpoints_dir(self.run_dir) / ckpt.step_dir_name(step)
        try:
            if acc.is_main_process:
                ckpt.begin_save(self.run_dir, step)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if acc.is_main_process:
                torch.save(self.latent_rng.get_state(), tmp / LATENT_RNG_FILE)
                torch.save(self.augment_rng.get_state(), tmp / AUGMENT_RNG_FILE)
                if self.ema is not None:
                    save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}, tmp / ckpt.EMA_FILE)
            _crash_point("save", step)
            acc.wait_for_everyone()
            if acc.is_main_process:
                meta = {"state": asdict(self.state), "num_processes": acc.num_processes,
                        "config": self.cfg.to_dict(), "git_revision": self.git_revision}
                final = ckpt.publish(self.run_dir, tmp, step, meta, self.cfg.checkpoint.keep)
                self.log.info("checkpoint saved: %s", final)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            reason = _write_failure(exc, self.run_dir)  # before cleaning up frees the space again
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = ckpt.find_latest(self.run_dir)
            raise TrainingError(f"could not write checkpoint {final} ({reason}); "
                                f"the newest complete checkpoint is still {previous}") from exc
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> Optional[int]:
        """Restore the full training state; returns the number of processes that wrote the checkpoint."""
        meta = ckpt.read_meta(path)  # verified by resolve_resume
        ckpt.verify_safe(path)
        saved_model = meta.get("config", {}).get("model", {})
        for key, value in asdict(self.cfg.model).items():
            if key in ARCHITECTURE_KEYS and key in saved_model and saved_model[key] != value:
                raise CheckpointError(f"{path}: trained with model.{key}={saved_model[key]!r}, "
                                      f"but the config says {value!r}")
        if self.ema is not None and not (path / ckpt.EMA_FILE).is_file():
            raise CheckpointError(f"{path}: has no {ckpt.EMA_FILE}, but the config sets train.ema_decay: "
                                  "resume with train.ema_decay=null, or start a new run")
        try:
            self.acc.load_state(str(path))
        except RuntimeError as exc:  # shape/key mismatch from load_state_dict
            raise CheckpointError(f"{path}: does not fit these networks: {first_line(exc)}") from None
        try:
            self.latent_rng.set_state(torch.load(path / LATENT_RNG_FILE, weights_only=True))
            if (path / AUGMENT_RNG_FILE).is_file():
                self.augment_rng.set_state(torch.load(path / AUGMENT_RNG_FILE, weights_only=True))
            elif self.cfg.data.augment:
                self.log.warning("%s: written before augmentation had its own random stream (no %s); the stream "
                                 "starts again from the seed", path, AUGMENT_RNG_FILE)
            if self.ema is not None:
                self.ema.load_state_dict(load_file(str(path / ckpt.EMA_FILE), device=str(self.acc.device)))
        except Exception as exc:  # verify() passed, so only a checkpoint of another kind gets here
            raise CheckpointError(f"{path}: unreadable checkpoint file ({type(exc).__name__}: {first_line(exc, 120)})") from None
        self.state = TrainState(**meta["state"])
        return meta.get("num_processes")

    def resolve_resume(self) -> Optional[Path]:
        choice = self.cfg.train.resume
        if choice == "none":
            if ckpt.complete_checkpoints(self.run_dir):
                raise ConfigError(f"train.resume='none' but {ckpt.checkpoints_dir(self.run_dir)} holds checkpoints of an "
                                  "earlier run: choose another run_dir, or resume with train.resume=auto")
            return None
        if choice == "auto":
            return self._newest_intact_checkpoint()
        path = Path(choice)
        if not path.is_dir():
            raise ConfigError(f"train.resume={choice!r}: no such checkpoint folder")
        ckpt.verify(path)  # the one the user named: damage is an error, not a fallback
        return path

    def _newest_intact_checkpoint(self) -> Optional[Path]:
        """The newest checkpoint that is as it was written; newer damaged ones are moved aside, and said so."""
        intact, damaged = ckpt.newest_intact(self.run_dir)  # every process decides alike, before anything moves
        if damaged and intact is None:
            raise ckpt.no_intact_error(self.run_dir, damaged)
        self.acc.wait_for_everyone()
        if damaged and self.acc.is_main_process:
            for bad, reason in damaged:
                moved = ckpt.set_aside(bad)
                self.log.warning("checkpoint %s is damaged (%s): moved to %s for inspection; resuming from %s",
                                 bad.name, reason, moved, intact)
            ckpt.write_text_atomic(ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST, intact.name + "\n")
        self.acc.wait_for_everyone()
        return intact

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        cfg, acc, log = self.cfg, self.acc, self.log
        if acc.is_main_process:
            self.git_revision = write_run_info(self.run_dir, cfg)
            ckpt.remove_stale_temporaries(self.run_dir)
        acc.wait_for_everyone()
        self.tracking.start()
        resume_from = self.resolve_resume()
        if resume_from is not None:
            saved_processes = self.load_checkpoint(resume_from)
            log.info("resumed from %s (step %d, epoch %d, batch %d of the epoch)", resume_from,
                     self.state.step, self.state.epoch, self.state.batch_in_epoch)
            if saved_processes not in (None, acc.num_processes):
                log.info("the checkpoint was written by %d process(es), this run has %d: data order, latents and "
                         "augmentation continue as they would have; dropout's per-process RNG continues for ranks "
                         "below %d and starts from seed + rank for the others", saved_processes, acc.num_processes,
                         min(saved_processes, acc.num_processes))

        total = self.total_steps
        if acc.num_processes > 1:  # which node each rank runs on, as the launcher arranged it
            from accelerate.utils import gather_object

            placement = gather_object([f"{acc.process_index}@node{os.environ.get('GROUP_RANK', '0')}"])
            log.info("process group: world size %d, ranks %s", acc.num_processes, " ".join(placement))
        log.info("training %s: %d images, %d process(es) on %s, global batch %d (%d per process), precision %s, "
                 "%d iterations", cfg.name, self.num_images, acc.num_processes, acc.device, cfg.train.batch_size,
                 self.per_device_batch, cfg.train.precision, total)

        bar = tqdm(total=total, initial=self.state.step, disable=not (acc.is_main_process and sys.stderr.isatty()),
                   dynamic_ncols=True, desc=cfg.name)
        last_saved = self.state.step if resume_from is not None else -1
        window_start, window_images = time.perf_counter(), 0

        with torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly), stop_signals(self._on_signal), \
                peers_lost(self.run_dir, cfg.train.collective_timeout_s):
            while self.state.step < total and self.state.epoch < cfg.train.epochs:
                # The prepared loader numbers its epochs itself; keep it on ours (it passes it to the sampler).
                self.loader.set_epoch(self.state.epoch)
                self.sampler.skip_in_epoch(self.state.epoch, self.state.batch_in_epoch * cfg.train.batch_size)
                for batch in self.loader:
                    metrics_t = self.train_step(self.prepare_reals(batch))
                    self.state.step += 1
                    self._pending.append((self.state.step, metrics_t))
                    self.state.batch_in_epoch += 1
                    window_images += cfg.train.batch_size
                    bar.update(1)
                    if self.state.step % cfg.train.log_every == 0 or self.state.step == total:
                        metrics = self._reduce_pending()
                        now = time.perf_counter()
                        metrics["images_per_s"] = window_images / (now - window_start)
                        metrics["lr_g"], metrics["lr_d"] = self.lr_used  # of the last iteration
                        metrics["epoch"] = self.state.epoch
                        window_start, window_images = now, 0
                        self.tracking.log_metrics(metrics, self.state.step)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
                        log.info("epoch %d step %d %s", self.state.epoch, self.state.step,
                                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                    if cfg.log.sample_every and self.state.step % cfg.log.sample_every == 0:
                        self.log_samples()
                    if cfg.eval.every_steps and self.state.step % cfg.eval.every_steps == 0:
                        self.evaluate()
                    every = cfg.checkpoint.every_steps
                    if every and self.state.step % every == 0:
                        self.save_checkpoint()
                        last_saved = self.state.step
                    if self.state.step >= total or self._should_stop():
                        break
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    if cfg.eval.every_epochs and self.state.epoch % cfg.eval.every_epochs == 0:
                        self.evaluate()
                    every = cfg.checkpoint.every_epochs
                    if every and self.state.epoch % every == 0 and last_saved != self.state.step:
                        self.save_checkpoint()
                        last_saved = self.state.step
                    continue
                break
            bar.close()
            if not (cfg.log.sample_every and self.state.step % cfg.log.sample_every == 0):
                self.log_samples()
            if last_saved != self.state.step:
                final_ckpt = self.save_checkpoint()
            else:
                final_ckpt = ckpt.checkpoints_dir(self.run_dir) / ckpt.step_dir_name(self.state.step)
            if self._stop_signal is not None:
                raise Preempted(self._stop_signal, final_ckpt)

        log.info("training finished at step %d; final checkpoint %s", self.state.step, final_ckpt)
        self.final_checkpoint = final_ckpt
        return self.state

    def log_samples(self) -> None:
        """Main process: the generator's images for the fixed latents, to samples/ and the tracker."""
        if self.acc.is_main_process:
            generator = self.output_generator()
            with torch.no_grad(), self.acc.autocast():
                images = generator(self.fixed_latents.to(self.acc.device))
            self.tracking.log_samples(to_uint8_pictures(images), self.state.step)

    def evaluate(self) -> Optional[dict]:
        """Main process: FMD, KID and diversity of the output generator against training images, logged;
        the best generator by FMD is exported to ``<run_dir>/best``. Returns the scores (main process)."""
        result = None
        if self.acc.is_main_process:
            from .quality import QualityMeter, sample_images

            cfg = self.cfg
            n = min(cfg.eval.num_samples, self.num_images)
            if self.meter is None:
                pick = torch.randperm(self.num_images, generator=torch.Generator().manual_seed(cfg.train.seed))[:n]
                self.meter = QualityMeter(scale_intensity(self.images[pick]), cfg.eval.classifier,
                                          seed=cfg.train.seed, device=self.acc.device)
            generator = self.output_generator()
            with self.acc.autocast():
                images = sample_images(generator, cfg.model.latent_size, n, cfg.train.seed + 2_000_003, "normal",
                                       device=self.acc.device)
            scores = self.meter.score(images)
            result = {"eval/fmd": scores.fmd, "eval/kid": scores.kid, "eval/diversity": scores.diversity,
                      "eval/diversity_real": self.meter.real_diversity}
            self.tracking.log_metrics(result, self.state.step)
            self.log.info("evaluation at step %d: FMD %.3f KID %.5f diversity %.4f (real %.4f)", self.state.step,
                          scores.fmd, scores.kid, scores.diversity, self.meter.real_diversity)
            if cfg.eval.keep_best and scores.fmd < self.best_fmd:
                self.best_fmd = scores.fmd
                provenance = {"step": self.state.step, "epoch": self.state.epoch, "eval": {**result, "num_samples": n},
                              "git_revision": self.git_revision, "config": cfg.to_dict()}
                export_generator(self._generator_copy(), cfg.model, self.run_dir / BEST_DIR, provenance)
                self.log.info("new best FMD %.3f: exported to %s", scores.fmd, self.run_dir / BEST_DIR)
        self.acc.wait_for_everyone()
        return result

    def _generator_copy(self) -> torch.nn.Module:
        generator = build_generator(self.cfg.model, init=False)
        generator.load_state_dict(self.output_generator().state_dict())
        return generator

    def export(self, out_dir: Path) -> None:
        """Main process: the trained generator's exports, from a fresh copy of its weights."""
        if self.acc.is_main_process:
            generator = self._generator_copy()
            meta = ckpt.read_meta(self.final_checkpoint)
            export_generator(generator, self.cfg.model, out_dir,
                             checkpoint_provenance(self.final_checkpoint, meta), onnx=self.cfg.export.onnx)
            self.log.info("exported the generator to %s", out_dir)
            self.tracking.log_artifact(out_dir)
        self.acc.wait_for_everyone()

    def _reduce_pending(self, consume: bool = True) -> dict[str, float]:
        """Average the pending per-step metrics over processes and steps: one host sync.

        Stops training with the first step whose loss is NaN/Inf (under ``train.nonfinite=stop``).
        """
        if not self._pending:
            return {}
        steps = [s for s, _ in self._pending]
        keys = list(self._pending[0][1])
        local = torch.stack([torch.stack([m[k].float() for k in keys]) for _, m in self._pending])
        per_step = self.acc.reduce(local, reduction="mean").cpu()
        if consume:
            self._pending.clear()
        finite = torch.isfinite(per_step[:, [keys.index("loss_d"), keys.index("loss_g")]]).all(dim=1)
        if self.cfg.train.nonfinite == "stop" and not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            values = ", ".join(f"{k}={per_step[i, j].item():.4g}" for j, k in enumerate(keys) if k.startswith("loss"))
            raise TrainingError(f"non-finite loss at step {steps[i]} ({values}); stopped before any checkpoint "
                                f"held it, the newest checkpoint is {ckpt.find_latest(self.run_dir)} "
                                "(train.nonfinite=skip skips such updates instead)")
        return dict(zip(keys, per_step.mean(0).tolist()))

    def _on_signal(self, signum: int) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signal.Signals(signum).name
        self.log.warning("received %s: saving a checkpoint after this iteration", self._stop_signal)

    def _should_stop(self) -> bool:
        """True on every process as soon as any process was signalled."""
        flag = self._stop_signal is not None
        if self.acc.num_processes == 1:
            return flag
        flag_t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        stop = bool(self.acc.reduce(flag_t, reduction="sum").item() > 0)
        if stop and self._stop_signal is None:
            self._stop_signal = "a signal on another process"
        return stop


def read_best_fmd(best_dir: Path, log) -> float:
    """The FMD of the generator kept in ``best_dir`` by an earlier (resumed) run; inf when there is none.

    A ``best_dir`` whose record cannot be read is moved aside (``best.damaged``), never overwritten.
    """
    if not best_dir.exists():
        return math.inf
    try:
        return float(json.loads((best_dir / "export.json").read_text())["eval"]["eval/fmd"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        moved = ckpt.set_aside(best_dir)
        log.warning("%s/export.json is unreadable (%s: %s): moved %s to %s; the next evaluation starts a new best",
                    best_dir, type(exc).__name__, first_line(exc, 80), best_dir.name, moved)
        return math.inf


def lr_factor(optim, total_steps: int):
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


@contextmanager
def peers_lost(run_dir: Path, timeout_s: int):
    """A collective that fails or times out (another process died or hangs) becomes one clear error."""
    try:
        yield
    except RuntimeError as exc:  # gloo reports timeouts and closed peers as plain RuntimeErrors
        text = str(exc)
        if not (isinstance(exc, torch.distributed.DistError) or any(
                marker in text for marker in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))):
            raise
        latest = ckpt.find_latest(run_dir)
        raise TrainingError(f"lost contact with another training process (no answer within train.collective_timeout_s="
                            f"{timeout_s} s, or it died: {first_line(exc, 160)}); "
                            f"run the same command again to resume from {latest}") from exc


def _write_failure(exc: Exception, folder: Path) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        if shutil.disk_usage(folder).free < 1 << 20:
            return "No space left on device"
    except OSError:
        pass
    return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__


def _crash_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: MEDNIST_GAN_CRASH_AT=save:<step> kills the process there."""
    if os.environ.get("MEDNIST_GAN_CRASH_AT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def frozen(module: torch.nn.Module):
    """Parameters of ``module`` do not require grad inside the block."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextmanager
def stop_signals(handler):
    """Route SIGUSR1/SIGTERM/SIGINT to ``handler`` (main thread only), restoring the old handlers after."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: handler(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(cfg: Config) -> Trainer:
    """Train (resuming when a checkpoint exists), then export the generator on the main process."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        if cfg.export.at_end:
            trainer.export(cfg.run_path / "export")
    finally:
        trainer.tracking.finish()
    return trainer
