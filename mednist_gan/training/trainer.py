"""The GAN training loop: the discriminator phase, the generator phase, and the housekeeping after a step.

One iteration has the semantics of ``monai.engines.GanTrainer`` as the seed bundle uses it: for each
real batch, one fake batch from fresh latents; ``d_train_steps`` discriminator updates on those same
real and (detached) fake images; then fresh latents and one generator update (``g_train_steps``
updates, each on fresh latents). Options beyond the bundle, all off in its recipe: loss variants, an
R1 penalty, per-phase batch sizes, learning-rate warm-up/decay, an EMA of the generator's weights.

Reading order: ``Trainer.__init__`` (what a run is made of), ``train_step`` (one iteration), ``fit`` (the
loop and its periodic duties), then ``save_checkpoint``/``load_checkpoint``. Devices, processes and
precision come from ``runtime.make_accelerator``; stopping and exit codes from ``runcontrol``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..checkpoint import TrainState
from ..config import Config, ModelConfig
from ..data import apply_augment, build_dataloader, load_labelled_dataset, sample_augment_params, scale_intensity
from ..errors import CheckpointError, ConfigError, TrainingError, first_line
from .in_training_eval import InTrainingEvaluation
from ..generator.export import checkpoint_provenance, export_generator
from ..files import EXPORT_DIR, write_atomic
from ..runtime.cuda_graphs import PhaseGraphs
from ..images import to_uint8_pictures
from ..models.losses import discriminator_loss, generator_loss, mode_seeking_penalty, r1_penalty
from ..models.networks import build_discriminator, build_generator, generator_copy
from .optim import keep_run_options, make_optimizers, make_schedulers
from .stopping import EndedEarly, Preempted, StopRequest, crash_point, peers_lost, write_failure
from ..runtime.accelerator import (compiled_forwards, graph_capture, make_accelerator, memory_format, optimizer_options,
                      precision_warning, prepare_networks)
from .tracking import (Tracking, check_tracker_installed, close_log_file, lock_run_dir, open_log_file,
                       setup_logging, tracker_dir, unlock_run_dir, write_run_info)

LATENT_RNG_FILE, AUGMENT_RNG_FILE = "latent_rng.pt", "augment_rng.pt"  # shared streams, saved by the main process
AUGMENT_SEED_OFFSET = 3_000_017
SAMPLE_SEED_OFFSET = 1_000_003


@dataclass
class Periodic:
    """A duty after an iteration: due every N steps, at the end of every N epochs, and/or after the last step.

    ``fit`` runs each due duty once per step, in the order given.
    """

    action: Callable[[], object]
    every_steps: Optional[int] = None
    every_epochs: Optional[int] = None
    at_end: bool = False

    def due(self, state: TrainState, epoch_ended: bool, last: bool) -> bool:
        return bool((self.every_steps and state.step % self.every_steps == 0)
                    or (self.every_epochs and epoch_ended and state.epoch % self.every_epochs == 0)
                    or (self.at_end and last))


# Called on the main process with (step, evaluation result) after each evaluation; a returned reason ends
# the run early (checkpoint, then ``EndedEarly``): a sweep reports to its pruner this way.
EvaluationCallback = Callable[[int, dict], Optional[str]]


class Trainer:
    def __init__(self, cfg: Config, accelerator: Optional[Accelerator] = None,
                 on_evaluation: Optional[EvaluationCallback] = None):
        self.cfg = cfg
        self.on_evaluation = on_evaluation
        self.run_dir = cfg.run_path
        check_tracker_installed(cfg.log.tracker)  # before Accelerate warns about it in its own words
        self.acc = acc = accelerator or make_accelerator(cfg, tracker_dir(cfg))
        self.log = setup_logging(self.run_dir, acc.is_main_process)
        if acc.is_main_process:  # one training process per run directory; the other ranks are part of this one
            lock_run_dir(self.run_dir)
        if (mismatch := precision_warning(cfg)) is not None:
            self.log.warning(mismatch)
        world = acc.num_processes
        g_batch = cfg.train.g_batch_size or cfg.train.batch_size
        for key, value in (("train.batch_size", cfg.train.batch_size), ("train.g_batch_size", g_batch)):
            if value % world:
                raise ConfigError(f"{key}={value} must be divisible by the number of processes ({world})")
        self.per_device_batch = cfg.train.batch_size // world
        if cfg.model.arch == "resnet" and cfg.model.resnet_mbstd and self.per_device_batch % cfg.model.resnet_mbstd:
            raise ConfigError(f"model.resnet_mbstd={cfg.model.resnet_mbstd} must divide the per-process batch "
                              f"({self.per_device_batch}): its groups must not straddle two processes")
        self.per_device_g_batch = g_batch // world
        if cfg.train.mode_seeking and self.per_device_g_batch % 2:
            raise ConfigError(f"train.mode_seeking pairs the generator's latents: its per-process batch "
                              f"({self.per_device_g_batch}) must be even")

        with acc.main_process_first():  # the main process decodes and fills the cache; the others read it
            self.images, self.labels = load_labelled_dataset(cfg.data, cfg.model.image_shape)
        # A class-conditional run (several data.classes): G and D take labels, the indices of model.classes.
        self.num_classes = len(cfg.model.classes)
        self.num_images = len(self.images)
        if self.num_images < world:
            raise ConfigError(f"{self.num_images} images cannot feed {world} processes: use fewer processes or more data")
        if cfg.train.batch_size > self.num_images:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the data set ({self.num_images} "
                              f"images in {cfg.data.root or 'the built-in sample'}): use a batch of at most "
                              f"{self.num_images}, or more data")
        self.batches_per_epoch = math.ceil(self.num_images / cfg.train.batch_size)
        self.total_steps = self.batches_per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        set_seed(cfg.train.seed)  # identical initial weights on every process
        G, D = prepare_networks(build_generator(cfg.model), build_discriminator(cfg.model), cfg.runtime, acc.device)
        # The moving average starts from the initial weights; one plain module, never wrapped by Accelerate.
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = generator_copy(cfg.model, G).to(acc.device).requires_grad_(False).eval()
        capture, capture_off = graph_capture(cfg, acc.device, world)
        if capture_off is not None:
            self.log.info(capture_off)
        # Each phase of an iteration runs as one CUDA graph (after a few eager runs) where the run allows it.
        self.graphs = PhaseGraphs(enabled=capture)
        opt_g, opt_d = make_optimizers(G, D, cfg.optim, **optimizer_options(cfg.runtime, acc.device, capture))
        # The images stay on the training device; the loader hands out indices, gathered there (prepare_reals).
        self.device_images, self.device_labels = self.images.to(acc.device), self.labels.to(acc.device)
        loader = build_dataloader(self.num_images, cfg.train.batch_size, cfg.train.seed,
                                  pin_memory=acc.device.type == "cuda", labels=self.labels,
                                  class_weights=cfg.data.sampling_weights)
        self.sampler = loader.sampler
        self.G, self.D, self.opt_g, self.opt_d, self.loader, *self.schedulers = acc.prepare(
            G, D, opt_g, opt_d, loader, *make_schedulers((opt_g, opt_d), cfg.optim, self.total_steps))
        self.memory_format = memory_format(cfg.runtime)
        # The training forward passes, compiled when runtime.compile asks (the modules themselves stay as they are:
        # checkpoints, EMA and exports see the same state_dict).
        self.g_forward, self.d_forward, compile_note = compiled_forwards(self.G, self.D, cfg)
        if compile_note is not None:
            self.log.info(compile_note)

        # Latents and augmentation parameters come from generators shared by all processes: each
        # draws for the global batch and keeps its slice, so neither depends on the number of processes.
        self.latent_rng = torch.Generator(device=acc.device).manual_seed(cfg.train.seed)
        weights = cfg.data.sampling_weights
        self.label_weights = None if weights is None else torch.tensor(weights, device=acc.device)
        self.augment_rng = torch.Generator(device=acc.device).manual_seed(cfg.train.seed + AUGMENT_SEED_OFFSET)
        # Dropout uses the global RNG, different on every process (numpy's seeds stop at 2**32 - 1).
        set_seed((cfg.train.seed + acc.process_index) % 2**32)
        # A fixed latent batch (its own seed, drawn once) makes sample grids comparable over time.
        self.fixed_latents = torch.randn(cfg.log.num_samples, cfg.model.latent_size,
                                         generator=torch.Generator().manual_seed(cfg.train.seed + SAMPLE_SEED_OFFSET))
        # ...and for a conditional generator, one row of the grid per class (as many as fit).
        self.fixed_labels = None
        if self.num_classes:
            per_class = max(1, cfg.log.num_samples // self.num_classes)
            self.fixed_labels = torch.arange(cfg.log.num_samples) // per_class % self.num_classes

        self.state = TrainState()
        self.tracking = Tracking(cfg, acc, self.run_dir, self.log)
        self.evaluation = (InTrainingEvaluation(cfg, self.images, self.run_dir, acc.device, self.log, self.labels)
                           if acc.is_main_process else None)
        self.stop = StopRequest()
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []  # (step, metrics) not yet reduced
        self._window_start = time.perf_counter()  # images/s: over the steps since the last log line
        self.skipped_updates = 0
        self.git_revision: Optional[str] = None
        self.final_checkpoint: Optional[Path] = None
        self.step_epoch = 0  # the epoch of the step that just ran (state.epoch moves on at its end)

    # ------------------------------------------------------------------ one iteration

    def my_slice(self, n: int) -> slice:
        """This process's ``n`` samples of a global batch of ``n`` per process (Accelerate's split_batches order)."""
        return slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)

    def sample_latents(self, n: int) -> torch.Tensor:
        z = torch.randn(n * self.acc.num_processes, self.cfg.model.latent_size,
                        generator=self.latent_rng, device=self.acc.device)
        return z[self.my_slice(n)]

    def sample_labels(self, n: int, pairs: bool = False) -> Optional[torch.Tensor]:
        """Class labels for ``n`` generated images per process, uniform over the classes or drawn in proportion to
        ``data.class_weights`` (None: unconditional); ``pairs``: images 2k and 2k+1 share one (the mode-seeking
        term compares them)."""
        if not self.num_classes:
            return None
        total = n * self.acc.num_processes
        draws = total // 2 if pairs else total
        if self.label_weights is None:
            y = torch.randint(self.num_classes, (draws,), generator=self.latent_rng, device=self.acc.device)
        else:
            y = torch.multinomial(self.label_weights, draws, replacement=True, generator=self.latent_rng)
        return (y.repeat_interleave(2) if pairs else y)[self.my_slice(n)]

    def real_labels(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The class labels of a batch of image indices (None: unconditional)."""
        return self.device_labels[indices] if self.num_classes else None

    def generate(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.g_forward(z) if labels is None else self.g_forward(z, labels)

    def discriminate(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     eager: bool = False) -> torch.Tensor:
        """D's logits; ``eager`` bypasses runtime.compile (R1 differentiates them twice, which compiled code cannot)."""
        forward = self.D if eager else self.d_forward
        return forward(images) if labels is None else forward(images, labels)

    def prepare_reals(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's slice of a batch of image indices, as scaled (and augmented) float images on the device."""
        with torch.no_grad():
            real = scale_intensity(self.device_images[indices])
            if self.cfg.data.augment:
                n = real.shape[0]
                params = sample_augment_params(n * self.acc.num_processes, real.device, self.augment_rng)
                real = apply_augment(real, params[self.my_slice(n)])
        return real.contiguous(memory_format=self.memory_format)

    def train_step(self, real: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """One iteration on a batch of prepared real images (and their class labels, for a conditional run);
        returns detached per-step metrics.

        Latents (and the generated images' labels) come from the trainer's own generator here, outside the
        phases, which ``self.graphs`` may replay as CUDA graphs (so nothing in a phase may depend on a Python
        value that changes per step).
        """
        opts = self.cfg.train
        first = self.state.step * opts.d_train_steps
        with_r1 = tuple(opts.r1_gamma > 0 and (first + i) % opts.r1_every == 0 for i in range(opts.d_train_steps))
        z = self.sample_latents(self.per_device_batch)
        conditions = () if labels is None else (labels, self.sample_labels(self.per_device_batch))
        d_metrics = self.graphs(("d", with_r1), lambda real, z, *y: self.discriminator_phase(real, z, with_r1, *y),
                                real, z, *conditions)
        g_metrics = []
        for j in range(opts.g_train_steps):
            skipped = self.skipped_updates
            z = self.sample_latents(self.per_device_g_batch)
            conditions = () if labels is None else (self.sample_labels(self.per_device_g_batch, opts.mode_seeking > 0),)
            g_metrics.append(self.graphs(("g",), self.generator_update, z, *conditions))
            if self.skipped_updates == skipped:
                self.update_ema(self.state.step * opts.g_train_steps + j)
        # The rates this iteration used (a capturable optimizer's are tensors, which the schedulers refill in place).
        self.lr_used = tuple(lr.clone() if isinstance(lr, torch.Tensor) else lr
                             for lr in (self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]))
        for scheduler in self.schedulers:
            scheduler.step()
        g_metrics = {key: torch.stack([m[key] for m in g_metrics]).mean() for key in g_metrics[0]}
        return {"loss_d": d_metrics.pop("loss_d"), "loss_g": g_metrics.pop("loss_g"), **d_metrics, **g_metrics}

    def discriminator_phase(self, real: torch.Tensor, z: torch.Tensor, with_r1: tuple[bool, ...],
                            real_labels: Optional[torch.Tensor] = None,
                            fake_labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """One update of D per entry of ``with_r1`` (True: with the R1 penalty), all on ``real`` and one fake batch."""
        acc, opts = self.acc, self.cfg.train
        with torch.no_grad():  # D only ever sees the fake batch detached: it needs no graph
            fake = self.generate(z, fake_labels)
        d_losses, r1_values = [], []
        for r1_now in with_r1:
            self.opt_d.zero_grad(set_to_none=True)
            real_in = real.detach().requires_grad_(True) if r1_now else real
            real_logits = self.discriminate(real_in, real_labels, eager=r1_now)
            fake_logits = self.discriminate(fake, fake_labels)
            loss_d = total_d = discriminator_loss(real_logits, fake_logits, opts.loss)
            if r1_now:
                r1 = r1_penalty(real_logits, real_in)
                total_d = loss_d + (opts.r1_gamma / 2 * opts.r1_every) * r1
                r1_values.append(r1.detach())
            acc.backward(total_d)
            if self._skip_nonfinite(total_d, self.opt_d):
                continue
            self.opt_d.step()
            d_losses.append(loss_d.detach())
        metrics = {
            "loss_d": torch.stack(d_losses).mean() if d_losses else loss_d.detach(),
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }
        if opts.r1_gamma > 0:  # NaN on iterations without an R1 update would poison the average: 0 there
            metrics["r1"] = torch.stack(r1_values).mean() if r1_values else torch.zeros((), device=acc.device)
        return metrics

    def generator_update(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """One update of G on latents ``z`` (and labels); D's parameters need no gradient, and D's DDP wrapper must
        not wait for one."""
        opts = self.cfg.train
        self.opt_g.zero_grad(set_to_none=True)
        with frozen(self.D), self.acc.no_sync(self.D):
            fake = self.generate(z, labels)
            loss_g = total_g = generator_loss(self.discriminate(fake, labels), opts.loss)
            if opts.mode_seeking:
                mode_seeking = mode_seeking_penalty(fake, z)
                total_g = loss_g + opts.mode_seeking * mode_seeking
        self.acc.backward(total_g)
        if not self._skip_nonfinite(total_g, self.opt_g):
            self.opt_g.step()
        return {"loss_g": loss_g.detach(), **({"mode_seeking": mode_seeking.detach()} if opts.mode_seeking else {})}

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

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        self._start()  # may replace self.state with a checkpoint's
        cfg, acc, state = self.cfg, self.acc, self.state
        duties = [
            Periodic(self.log_progress, every_steps=cfg.train.log_every, at_end=True),
            Periodic(self.log_samples, every_steps=cfg.log.sample_every, at_end=True),
            Periodic(self.evaluate, every_steps=cfg.eval.every_steps, every_epochs=cfg.eval.every_epochs),
            Periodic(self.save_checkpoint, every_steps=cfg.checkpoint.every_steps,
                     every_epochs=cfg.checkpoint.every_epochs, at_end=True),
        ]
        bar = tqdm(total=self.total_steps, initial=state.step, dynamic_ncols=True, desc=cfg.name,
                   disable=not (acc.is_main_process and sys.stderr.isatty()))
        with torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly), self.stop, \
                peers_lost(lambda: ckpt.find_latest(self.run_dir), cfg.train.collective_timeout_s):
            for batch in self._batches():
                self._pending.append((state.step + 1, self.train_step(self.prepare_reals(batch), self.real_labels(batch))))
                state.step += 1
                state.batch_in_epoch += 1
                self.step_epoch = state.epoch  # the epoch this step belongs to, for the log
                epoch_ended = self._advance_epoch()
                last = state.step >= self.total_steps or self.stop.requested(acc)
                for duty in duties:
                    if duty.due(state, epoch_ended, last):
                        duty.action()
                bar.update(1)
                if last:
                    break
            bar.close()
        if self.stop.early_end is not None:  # before a signal: the caller's verdict on this run is final
            raise EndedEarly(self.stop.early_end, self.final_checkpoint)
        if self.stop.signal_name is not None:
            raise Preempted(self.stop.signal_name, self.final_checkpoint)
        self.log.info("training finished at step %d; final checkpoint %s", state.step, self.final_checkpoint)
        return state

    def _start(self) -> None:
        """Resume (its checks refuse before anything is written), then run info, train.log, stale temporaries,
        and the opening log lines."""
        acc, cfg = self.acc, self.cfg
        resume_from, damaged = self.resolve_resume()
        saved_processes = self.load_checkpoint(resume_from) if resume_from is not None else None
        acc.wait_for_everyone()  # every process has read its checkpoint before the main process moves any
        if acc.is_main_process:
            self._set_aside(damaged, resume_from)
            self.git_revision = write_run_info(self.run_dir, cfg)
            open_log_file(self.log, self.run_dir)
            ckpt.remove_stale_temporaries(self.run_dir)
        acc.wait_for_everyone()
        if resume_from is not None:
            self._advance_epoch()
            self.final_checkpoint = resume_from
            self.log.info("resumed from %s (step %d, epoch %d, batch %d of the epoch)", resume_from,
                          self.state.step, self.state.epoch, self.state.batch_in_epoch)
            if saved_processes not in (None, acc.num_processes):
                self.log.info("the checkpoint was written by %d process(es), this run has %d: data order, latents and "
                              "augmentation continue as they would have; dropout's per-process RNG continues for "
                              "ranks below %d and starts from seed + rank for the others", saved_processes,
                              acc.num_processes, min(saved_processes, acc.num_processes))
        self.tracking.start(self.state.step)  # drops records of the steps this run logs again
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restarts:  # the elastic launcher started this group again after a process died (launch/run.sh MAX_RESTARTS)
            self.log.info("elastic restart %d of at most %s", restarts, os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
        if acc.num_processes > 1:  # which node each rank runs on, as the launcher arranged it
            from accelerate.utils import gather_object

            placement = gather_object([f"{acc.process_index}@node{os.environ.get('GROUP_RANK', '0')}"])
            self.log.info("process group: world size %d, ranks %s", acc.num_processes, " ".join(placement))
        self.log.info("training %s: %d images, %d process(es) on %s, global batch %d (%d per process), precision %s, "
                      "%d iterations", cfg.name, self.num_images, acc.num_processes, acc.device, cfg.train.batch_size,
                      self.per_device_batch, cfg.train.precision, self.total_steps)

    def _advance_epoch(self) -> bool:
        """Start the next epoch when this one's batches are used up (checkpoints of older versions can
        hold a finished epoch as its last batch); True when it did."""
        if self.state.batch_in_epoch < self.batches_per_epoch:
            return False
        self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        return True

    def _batches(self) -> Iterator[torch.Tensor]:
        """Global batches from the current position on, epoch after epoch; ``fit`` advances the counters."""
        while self.state.step < self.total_steps and self.state.epoch < self.cfg.train.epochs:
            # The prepared loader numbers its epochs itself; keep it on ours (it passes it to the sampler).
            self.loader.set_epoch(self.state.epoch)
            self.sampler.skip_in_epoch(self.state.epoch, self.state.batch_in_epoch * self.cfg.train.batch_size)
            yield from self.loader

    # ------------------------------------------------------------------ periodic duties

    def log_progress(self) -> None:
        """The pending steps' metrics, averaged over steps and processes, to the log and the tracker."""
        steps = len(self._pending)
        metrics = self._reduce_pending()
        if not metrics:
            return
        now = time.perf_counter()
        metrics["images_per_s"] = steps * self.cfg.train.batch_size / (now - self._window_start)
        metrics["lr_g"], metrics["lr_d"] = (float(lr) for lr in self.lr_used)  # of the last iteration (tensors under graphs)
        metrics["epoch"] = self.step_epoch
        self._window_start = now
        self.tracking.log_metrics(metrics, self.state.step)
        self.log.info("epoch %d step %d %s", self.step_epoch, self.state.step,
                      " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log_samples(self) -> None:
        """Main process: the generator's images for the fixed latents, to samples/ and the tracker."""
        if self.acc.is_main_process:
            generator, z = self.output_generator(), self.fixed_latents.to(self.acc.device)
            with torch.no_grad(), self.acc.autocast():
                images = generator(z) if self.fixed_labels is None else generator(z, self.fixed_labels.to(self.acc.device))
            columns = None if self.fixed_labels is None else max(1, self.cfg.log.num_samples // self.num_classes)
            self.tracking.log_samples(to_uint8_pictures(images), self.state.step, columns=columns)

    def evaluate(self) -> Optional[dict]:
        """Main process: FMD, KID and diversity of the output generator, logged; the best kept in ``best/``."""
        result = None
        if self.evaluation is not None:
            provenance = {"step": self.state.step, "epoch": self.step_epoch, "git_revision": self.git_revision}
            result = self.evaluation(self.output_generator(), self.acc.autocast(), self.state.step, provenance)
            self.tracking.log_metrics(result, self.state.step)
            if self.on_evaluation is not None and (reason := self.on_evaluation(self.state.step, result)):
                self.stop.end_early(reason)
        self.acc.wait_for_everyone()
        return result

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
            crash_point("save", step)
            acc.wait_for_everyone()
            if acc.is_main_process:
                meta = {"state": asdict(self.state), "num_processes": acc.num_processes,
                        "config": self.cfg.to_dict(), "git_revision": self.git_revision}
                final = ckpt.publish(self.run_dir, tmp, step, meta, self.cfg.checkpoint.keep)
                self.log.info("checkpoint saved: %s", final)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            reason = write_failure(exc, self.run_dir)  # before cleaning up frees the space again
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = ckpt.find_latest(self.run_dir)
            raise TrainingError(f"could not write checkpoint {final} ({reason}); "
                                f"the newest complete checkpoint is still {previous}") from exc
        acc.wait_for_everyone()
        self.final_checkpoint = final
        return final

    def load_checkpoint(self, path: Path) -> Optional[int]:
        """Restore the full training state; returns the number of processes that wrote the checkpoint."""
        meta = ckpt.read_meta(path)  # verified by resolve_resume
        ckpt.verify_safe(path)
        saved_model = meta.get("config", {}).get("model", {})
        for key in ModelConfig.architecture_keys():
            value = getattr(self.cfg.model, key)
            if key in saved_model and saved_model[key] != value:
                raise CheckpointError(f"{path}: trained with model.{key}={saved_model[key]!r}, "
                                      f"but the config says {value!r}")
        if self.ema is not None and not (path / ckpt.EMA_FILE).is_file():
            raise CheckpointError(f"{path}: has no {ckpt.EMA_FILE}, but the config sets train.ema_decay: "
                                  "resume with train.ema_decay=null, or start a new run")
        try:
            self.acc.load_state(str(path))
        except RuntimeError as exc:  # shape/key mismatch from load_state_dict
            raise CheckpointError(f"{path}: does not fit these networks: {first_line(exc)}") from None
        for optimizer in (self.opt_g, self.opt_d):
            keep_run_options(optimizer, self.acc.device)
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

    def resolve_resume(self) -> tuple[Optional[Path], list[tuple[Path, CheckpointError]]]:
        """The checkpoint to resume from (None: a fresh run), and the damaged newer ones that ``_set_aside``
        moves once it has loaded (read-only: every process decides alike)."""
        choice = self.cfg.train.resume
        if choice == "none":
            if ckpt.complete_checkpoints(self.run_dir):
                raise ConfigError(f"train.resume='none' but {ckpt.checkpoints_dir(self.run_dir)} holds checkpoints of an "
                                  "earlier run: choose another run_dir, or resume with train.resume=auto")
            return None, []
        if choice == "auto":
            intact, damaged = ckpt.newest_intact(self.run_dir)
            if damaged and intact is None:
                raise ckpt.no_intact_error(self.run_dir, damaged)
            return intact, damaged
        path = Path(choice)
        if not path.is_dir():
            raise ConfigError(f"train.resume={choice!r}: no such checkpoint folder")
        ckpt.verify(path)  # the one the user named: damage is an error, not a fallback
        return path, []

    def _set_aside(self, damaged: list[tuple[Path, CheckpointError]], intact: Optional[Path]) -> None:
        """Main process: move damaged checkpoints newer than ``intact`` aside for inspection, and say so; one that
        cannot be moved stops the run (its step would be saved again beside it)."""
        for bad, reason in damaged:
            try:
                moved = ckpt.set_aside(bad)
            except OSError as exc:
                raise CheckpointError(f"cannot move damaged checkpoint {bad} aside ({exc.strerror or first_line(exc)}); "
                                      f"it is damaged ({reason}): make {bad.parent} writable, or move {bad.name} "
                                      f"elsewhere yourself, then run again to resume from {intact.name}") from None
            self.log.warning("checkpoint %s is damaged (%s): moved to %s for inspection; resuming from %s",
                             bad.name, reason, moved, intact)
        if damaged:
            write_atomic(ckpt.checkpoints_dir(self.run_dir) / ckpt.LATEST, intact.name + "\n")

    def export(self, out_dir: Path) -> None:
        """Main process: the trained generator's exports, from a fresh copy of its weights."""
        if self.acc.is_main_process:
            meta = ckpt.read_meta(self.final_checkpoint)
            export_generator(generator_copy(self.cfg.model, self.output_generator()), self.cfg.model, out_dir,
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


def train(cfg: Config) -> Trainer:
    """Train (resuming when a checkpoint exists), then export the generator on the main process."""
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        if cfg.export.at_end:
            trainer.export(cfg.run_path / EXPORT_DIR)
    finally:
        trainer.tracking.finish()
        close_log_file(trainer.log)
        unlock_run_dir(cfg.run_path)
    return trainer
