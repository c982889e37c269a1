"""The training loop: a ``Trainer`` assembles a run, ``fit`` runs its iterations and the duties after them.

Reading order: ``Trainer.__init__`` (what a run is made of: data, networks, optimizers, the ``GanStep`` that runs
one iteration), ``fit`` (the loop, and after each iteration its ``Periodic`` duties: log, samples, evaluation,
checkpoint), then ``_start`` (resume, and the opening log lines). The maths of an iteration are in ``step.py``;
what a checkpoint holds, and resuming from one, in ``state.py``. Devices, processes and precision come from
``runtime.accelerator.make_accelerator``; stopping (signals, lost peers, an early end) and exit codes from
``stopping``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import checkpoint as ckpt
from ..checkpoint import TrainState
from ..config import Config
from ..data import build_dataloader, load_labelled_dataset
from ..errors import ConfigError
from ..files import EXPORT_DIR, PROVENANCE_FILE
from ..generator.export import ONNX_FILE, checkpoint_provenance, export_generator
from ..images import to_uint8_pictures
from ..models.networks import build_discriminator, build_generator, generator_copy
from ..runtime.accelerator import (graph_capture, make_accelerator, optimizer_options, precision_warning,
                                   prepare_networks)
from .in_training_eval import InTrainingEvaluation
from .optim import make_optimizers, make_schedulers
from .state import load_checkpoint, load_initial_weights, resume_choice, save_checkpoint, set_aside_damaged
from .step import GanStep, PendingMetrics, per_process_batches
from .stopping import EndedEarly, Preempted, StopRequest, peers_lost
from .run_folder import close_log_file, lock_run_dir, open_log_file, setup_logging, unlock_run_dir, write_run_info
from .tracking import Tracking, check_tracker_installed, tracker_dir

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
    """One training run of ``cfg`` in its run directory (which it locks): built here, trained by ``fit``."""

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
        self.per_device_batch, self.per_device_g_batch = per_process_batches(cfg, world)

        with acc.main_process_first():  # the main process decodes and fills the cache; the others read it
            self.images, self.labels = load_labelled_dataset(cfg.data, cfg.model.image_shape)
        # A class-conditional run (several data.classes): G and D take labels, the indices of model.classes.
        self.num_classes = len(cfg.model.classes)
        self.num_images = len(self.images)
        if self.num_images < world:
            raise ConfigError(f"{self.num_images} images cannot feed {world} processes: "
                              "use fewer processes or more data")
        if cfg.train.batch_size > self.num_images:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the data set ({self.num_images} "
                              f"images in {cfg.data.root or 'the built-in sample'}): use a batch of at most "
                              f"{self.num_images}, or more data")
        self.batches_per_epoch = math.ceil(self.num_images / cfg.train.batch_size)
        self.total_steps = self.batches_per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

        set_seed(cfg.train.seed)  # identical initial weights on every process
        G, D = build_generator(cfg.model), build_discriminator(cfg.model)
        if cfg.train.init_from is not None:  # fine-tuning: trained weights, fresh optimizers
            load_initial_weights(cfg, G, D, self.log)
        G, D = prepare_networks(G, D, cfg.runtime, acc.device)
        # The moving average starts from the initial weights; one plain module, never wrapped by Accelerate.
        self.ema = None
        if cfg.train.ema_decay is not None:
            self.ema = generator_copy(cfg.model, G).to(acc.device).requires_grad_(False).eval()
        # Phases captured as CUDA graphs where the run allows it, which needs capturable optimizers.
        capture, capture_off = graph_capture(cfg, acc.device, world)
        if capture_off is not None:
            self.log.info(capture_off)
        opt_g, opt_d = make_optimizers(G, D, cfg.optim, **optimizer_options(cfg.runtime, acc.device, capture))
        # The loader hands out indices; the step gathers the images on the training device (GanStep.prepare_reals).
        loader = build_dataloader(self.num_images, cfg.train.batch_size, cfg.train.seed,
                                  pin_memory=acc.device.type == "cuda", labels=self.labels,
                                  class_weights=cfg.data.sampling_weights)
        self.sampler = loader.sampler
        self.G, self.D, self.opt_g, self.opt_d, self.loader, *self.schedulers = acc.prepare(
            G, D, opt_g, opt_d, loader, *make_schedulers((opt_g, opt_d), cfg.optim, self.total_steps))
        self.gan_step = GanStep(cfg, acc, self.G, self.D, self.opt_g, self.opt_d, self.schedulers, self.ema,
                                self.images, self.labels, (self.per_device_batch, self.per_device_g_batch),
                                capture, self.log)
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
        self.pending = PendingMetrics(acc, cfg.train.nonfinite, self.run_dir)  # the steps not logged yet
        self._window_start = time.perf_counter()  # images/s: over the steps since the last log line
        self.git_revision: Optional[str] = None
        self.final_checkpoint: Optional[Path] = None
        self.step_epoch = 0  # the epoch of the step that just ran (state.epoch moves on at its end)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        self._start()  # may replace self.state with a checkpoint's
        cfg, acc, state = self.cfg, self.acc, self.state
        duties = [
            Periodic(self.log_progress, every_steps=cfg.log.every_steps, at_end=True),
            Periodic(self.log_samples, every_steps=cfg.log.sample_every, at_end=True),
            Periodic(self.evaluate, every_steps=cfg.eval.every_steps, every_epochs=cfg.eval.every_epochs),
            Periodic(self.save_checkpoint, every_steps=cfg.checkpoint.every_steps,
                     every_epochs=cfg.checkpoint.every_epochs, at_end=True),
        ]
        bar = tqdm(total=self.total_steps, initial=state.step, dynamic_ncols=True, desc=cfg.name,
                   disable=not (acc.is_main_process and sys.stderr.isatty()))
        # On a terminal the log lines go through tqdm, which lifts the bar off its line to print each one.
        share_terminal = nullcontext() if bar.disable else logging_redirect_tqdm(loggers=[self.log])
        with torch.autograd.set_detect_anomaly(cfg.train.detect_anomaly), self.stop, share_terminal, \
                peers_lost(lambda: ckpt.find_latest(self.run_dir), cfg.train.collective_timeout_s):
            for batch in self._batches():
                real, labels = self.gan_step.prepare_reals(batch), self.gan_step.real_labels(batch)
                self.pending.add(state.step + 1, self.gan_step.run(real, labels, step=state.step))
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
        resume_from, damaged = resume_choice(cfg)
        saved_processes = None
        if resume_from is not None:
            self.state, saved_processes = load_checkpoint(acc, cfg, resume_from, self.gan_step, self.log)
        acc.wait_for_everyone()  # every process has read its checkpoint before the main process moves any
        if acc.is_main_process:
            set_aside_damaged(self.run_dir, damaged, resume_from, self.log)
            self.git_revision = write_run_info(self.run_dir, cfg)
            open_log_file(self.log, self.run_dir)
            ckpt.remove_stale_temporaries(self.run_dir)
        acc.wait_for_everyone()
        self.resumed_step = self.state.step
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
            self.log.info("elastic restart %d of at most %s", restarts,
                          os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
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
        steps = len(self.pending)
        metrics = self.pending.reduce()
        if not metrics:
            return
        now = time.perf_counter()
        metrics["images_per_s"] = steps * self.cfg.train.batch_size / (now - self._window_start)
        # The learning rates of the last iteration (tensors where phases are captured).
        metrics["lr_g"], metrics["lr_d"] = (float(lr) for lr in self.gan_step.lr_used)
        metrics["epoch"] = self.step_epoch
        self._window_start = now
        self.tracking.log_metrics(metrics, self.state.step)
        self.log.info("epoch %d step %d %s", self.step_epoch, self.state.step,
                      " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def log_samples(self) -> None:
        """Main process: the generator's images for the fixed latents, to samples/ and the tracker."""
        if self.acc.is_main_process:
            generator, z = self.output_generator(), self.fixed_latents.to(self.acc.device)
            labels = () if self.fixed_labels is None else (self.fixed_labels.to(self.acc.device),)
            with torch.no_grad(), self.acc.autocast():
                images = generator(z, *labels)
            columns, names = None, None
            if self.fixed_labels is not None:  # a row per class, named
                columns = max(1, self.cfg.log.num_samples // self.num_classes)
                names = [self.cfg.model.classes[int(label)] for label in self.fixed_labels[::columns]]
            self.tracking.log_samples(to_uint8_pictures(images), self.state.step, columns=columns, labels=names)

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

    def save_checkpoint(self) -> Path:
        """The full state as the newest checkpoint (``state.save_checkpoint``), after the non-finite check."""
        self.pending.reduce(consume=False)  # never save weights that a non-finite loss has touched
        self.final_checkpoint = save_checkpoint(self.acc, self.cfg, self.state, self.gan_step, self.git_revision,
                                                self.log)
        return self.final_checkpoint

    def export(self, out_dir: Path) -> None:
        """Main process: the trained generator's exports, from a fresh copy of its weights; a rerun that trained
        nothing leaves an export of its final checkpoint as it is."""
        if self.acc.is_main_process and self.state.step == self.resumed_step and self._export_is_current(out_dir):
            self.log.info("%s already holds the export of %s: nothing new to export", out_dir, self.final_checkpoint)
        elif self.acc.is_main_process:
            meta = ckpt.read_meta(self.final_checkpoint)
            export_generator(generator_copy(self.cfg.model, self.output_generator()), self.cfg.model, out_dir,
                             checkpoint_provenance(self.final_checkpoint, meta), onnx=self.cfg.export.onnx)
            self.log.info("exported the generator to %s", out_dir)
            self.tracking.log_artifact(out_dir)
        self.acc.wait_for_everyone()

    def _export_is_current(self, out_dir: Path) -> bool:
        try:
            record = json.loads((out_dir / PROVENANCE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(record, dict) and record.get("checkpoint") == str(self.final_checkpoint.resolve())
                and (not self.cfg.export.onnx or (out_dir / ONNX_FILE).is_file()))

    def output_generator(self) -> torch.nn.Module:
        """The generator that samples, evaluation and exports use: the moving average when enabled."""
        return self.ema if self.ema is not None else self.acc.unwrap_model(self.G)


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
