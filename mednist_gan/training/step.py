"""One GAN iteration: the discriminator phase, the generator phase, the moving average, the non-finite policy.

One iteration has the semantics of ``monai.engines.GanTrainer`` as the seed bundle uses it: for each real batch,
one fake batch from fresh latents; ``d_train_steps`` discriminator updates on those same real and (detached) fake
images; then ``g_train_steps`` generator updates, each on fresh latents. Options beyond the bundle, all off in its
recipe: loss variants, a lazy R1 penalty (every ``r1_every``-th D update, scaled by ``r1_every``), per-phase batch
sizes, the mode-seeking term, an EMA of the generator's weights, class-conditional networks, augmentation of what D
sees (``d_augment.py``).

Reading order: ``GanStep.run`` (one iteration), then its two phases, ``discriminator_phase`` and
``generator_phase``: each a plain function of tensors, which ``run`` calls once through ``run_phase``. How the
step runs fast is settled once, in ``GanStep.__init__``: the networks' training forward passes (compiled where
``runtime.compile`` asks), whether a phase replays as a CUDA graph (``runtime.cuda_graphs.PhaseGraphs``), the
memory format of the real batch; the optimizers arrive built for it (capturable, with learning rates as tensors,
when phases are captured). None of these changes what a phase computes.

Random streams: latents, the generated images' labels and the augmentation parameters come from generators shared
by all processes (``latent_rng``, ``augment_rng``): each process draws for the global batch and keeps its slice, so
an iteration does not depend on the number of processes. They are drawn in ``run``, outside the phases, which a
CUDA graph may replay (so nothing in a phase depends on a Python value that changes per step). Dropout uses the
global RNG, different on every process.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from .. import checkpoint as ckpt
from ..config import Config
from ..data import apply_augment, sample_augment_params, scale_intensity
from ..errors import ConfigError, TrainingError
from ..models.losses import discriminator_loss, generator_loss, mode_seeking_penalty, r1_penalty
from ..runtime.accelerator import compiled_forwards, memory_format
from ..runtime.cuda_graphs import Phase, PhaseGraphs
from .d_augment import AdaptiveProbability, augment, draw

AUGMENT_SEED_OFFSET = 3_000_017
Metrics = dict[str, torch.Tensor]


def mode_seeking_weights(cfg: Config) -> list[float]:
    """The mode-seeking term's weight per class in label order (one for an unconditional run); all 0: off."""
    train = cfg.train
    return [train.mode_seeking_classes.get(name, train.mode_seeking) for name in cfg.model.classes or [None]]


def per_process_batches(cfg: Config, num_processes: int) -> tuple[int, int]:
    """The discriminator's and the generator's batch per process; refuses a global batch that the processes,
    the minibatch-stddev groups or the mode-seeking pairs cannot split evenly."""
    g_batch = cfg.train.g_batch_size or cfg.train.batch_size
    for key, value in (("train.batch_size", cfg.train.batch_size), ("train.g_batch_size", g_batch)):
        if value % num_processes:
            raise ConfigError(f"{key}={value} must be divisible by the number of processes ({num_processes})")
    d_batch = cfg.train.batch_size // num_processes
    if cfg.model.arch == "resnet" and cfg.model.resnet_mbstd and d_batch % cfg.model.resnet_mbstd:
        raise ConfigError(f"model.resnet_mbstd={cfg.model.resnet_mbstd} must divide the per-process batch "
                          f"({d_batch}): its groups must not straddle two processes")
    g_batch //= num_processes
    if any(mode_seeking_weights(cfg)) and g_batch % 2:
        raise ConfigError(f"train.mode_seeking pairs the generator's latents: its per-process batch "
                          f"({g_batch}) must be even")
    return d_batch, g_batch


class GanStep:
    """One training iteration of the (Accelerate-prepared) networks ``G`` and ``D`` with their optimizers.

    ``images``/``labels``: the whole data set (uint8 images, class indices), moved to the training device once; a
    batch is a tensor of indices into it. ``ema``: the generator's moving average, or None. ``batch_sizes``: the
    D and G phases' batch per process (``per_process_batches``). ``capture``: replay each phase as a CUDA graph
    (``runtime.graph_capture`` decides; the optimizers must then be capturable).
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, G: torch.nn.Module, D: torch.nn.Module,
                 opt_g, opt_d, schedulers: list, ema: Optional[torch.nn.Module], images: torch.Tensor,
                 labels: torch.Tensor, batch_sizes: tuple[int, int], capture: bool, log: logging.Logger):
        self.cfg, self.train_cfg, self.acc, self.log = cfg, cfg.train, accelerator, log
        self.G, self.D, self.opt_g, self.opt_d, self.schedulers, self.ema = G, D, opt_g, opt_d, schedulers, ema
        self.d_batch, self.g_batch = batch_sizes
        device = accelerator.device
        self.device_images, self.device_labels = images.to(device), labels.to(device)
        self.num_classes = len(cfg.model.classes)  # 0: unconditional networks, which take no labels

        # How the phases run fast, settled here once. The training forward passes are compiled when runtime.compile
        # asks (the modules themselves stay as they are: checkpoints, EMA and exports see the same state_dict); R1
        # differentiates D's logits twice, which compiled code cannot, so it runs the module itself.
        self.g_forward, self.d_forward, compile_note = compiled_forwards(G, D, cfg)
        if compile_note is not None:
            log.info(compile_note)
        self.d_forward_twice_differentiable = D
        self.graphs = PhaseGraphs(enabled=capture)  # each phase as one CUDA graph, after a few eager runs
        self.memory_format = memory_format(cfg.runtime)

        self.latent_rng = torch.Generator(device=device).manual_seed(cfg.train.seed)
        per_class = torch.tensor(mode_seeking_weights(cfg), device=device)  # train.mode_seeking_classes
        self.mode_seeking = per_class if bool(per_class.any()) else None  # None: the term is off
        weights = cfg.data.sampling_weights
        self.label_weights = None if weights is None else torch.tensor(weights, device=device)
        self.augment_rng = torch.Generator(device=device).manual_seed(cfg.train.seed + AUGMENT_SEED_OFFSET)
        # Augmenting what D sees (train.d_augment): always (DiffAugment), or with ADA's adaptive probability.
        self.d_augment = cfg.train.d_augment != "none"
        self.ada = (AdaptiveProbability(cfg.train.ada_target, cfg.train.ada_images, cfg.train.batch_size, device)
                    if cfg.train.d_augment == "ada" else None)
        self.skipped_updates = 0  # updates dropped for a non-finite loss (train.nonfinite=skip)
        self.iteration = 0  # the index (from 0) of the iteration running, for the log
        self.lr_used: Optional[tuple] = None  # the learning rates (G, D) of the last iteration

    # ------------------------------------------------------------------ inputs

    def process_slice(self, n: int) -> slice:
        """This process's ``n`` samples of a global batch of ``n`` per process (Accelerate's split_batches order)."""
        return slice(self.acc.process_index * n, (self.acc.process_index + 1) * n)

    def sample_latents(self, n: int) -> torch.Tensor:
        z = torch.randn(n * self.acc.num_processes, self.cfg.model.latent_size,
                        generator=self.latent_rng, device=self.acc.device)
        return z[self.process_slice(n)]

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
        return (y.repeat_interleave(2) if pairs else y)[self.process_slice(n)]

    def sample_d_augment(self, n: int, size: int) -> torch.Tensor:
        """Augmentation parameters for ``n`` images per process (``d_augment.draw``), at ADA's current probability."""
        p = 1.0 if self.ada is None else self.ada.p
        return draw(n * self.acc.num_processes, size, p, self.acc.device, self.augment_rng)[self.process_slice(n)]

    def real_labels(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        """The class labels of a batch of image indices (None: unconditional)."""
        return self.device_labels[indices] if self.num_classes else None

    def prepare_reals(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's slice of a batch of image indices, as scaled (and augmented) float images on the device."""
        with torch.no_grad():
            real = scale_intensity(self.device_images[indices])
            if self.cfg.data.augment:
                n = real.shape[0]
                params = sample_augment_params(n * self.acc.num_processes, real.device, self.augment_rng)
                real = apply_augment(real, params[self.process_slice(n)])
        return real.contiguous(memory_format=self.memory_format)

    # ------------------------------------------------------------------ one iteration

    def run(self, real: torch.Tensor, labels: Optional[torch.Tensor] = None, *, step: int) -> Metrics:
        """Iteration ``step`` (from 0) on a batch of prepared real images (and their class labels, for a conditional
        run); returns detached per-step metrics."""
        train = self.train_cfg
        self.iteration = step
        first = step * train.d_train_steps  # which D updates carry R1 counts over the whole run
        with_r1 = tuple(train.r1_gamma > 0 and (first + i) % train.r1_every == 0 for i in range(train.d_train_steps))
        z = self.sample_latents(self.d_batch)
        inputs = {"real": real, "z": z}
        if labels is not None:
            inputs.update(real_labels=labels, fake_labels=self.sample_labels(self.d_batch))
        if self.d_augment:
            size = real.shape[-1]
            inputs.update(real_aug=self.sample_d_augment(len(real), size),
                          fake_aug=self.sample_d_augment(self.d_batch, size))
        d_metrics = self.run_phase(("d", with_r1), partial(self.discriminator_phase, with_r1), **inputs)
        if self.ada is not None:
            self.ada.observe(d_metrics.pop("d_real_sign"))
        g_metrics = []
        for j in range(train.g_train_steps):
            skipped = self.skipped_updates
            inputs = {"z": self.sample_latents(self.g_batch)}
            if labels is not None:
                inputs["labels"] = self.sample_labels(self.g_batch, self.mode_seeking is not None)
            if self.d_augment:
                inputs["fake_aug"] = self.sample_d_augment(self.g_batch, real.shape[-1])
            g_metrics.append(self.run_phase(("g",), self.generator_phase, **inputs))
            if self.skipped_updates == skipped:
                self.update_ema(step * train.g_train_steps + j)
        # The rates this iteration used (a capturable optimizer's are tensors, which the schedulers refill in place).
        self.lr_used = tuple(lr.clone() if isinstance(lr, torch.Tensor) else lr
                             for lr in (self.opt_g.param_groups[0]["lr"], self.opt_d.param_groups[0]["lr"]))
        for scheduler in self.schedulers:
            scheduler.step()
        g_metrics = {key: torch.stack([m[key] for m in g_metrics]).mean() for key in g_metrics[0]}
        metrics = {"loss_d": d_metrics.pop("loss_d"), "loss_g": g_metrics.pop("loss_g"), **d_metrics, **g_metrics}
        if self.d_augment:
            metrics.update(self.augment_metrics(step))
        return metrics

    def augment_metrics(self, step: int) -> Metrics:
        """The augmentation probability this iteration used; with ADA its r_t (0 before the first adjustment),
        adjusted every ``train.ada_interval`` iterations."""
        if self.ada is None:
            return {"augment_p": torch.ones((), device=self.acc.device)}
        used = torch.tensor(self.ada.p, device=self.acc.device)
        if (step + 1) % self.train_cfg.ada_interval == 0:
            self.ada.adjust(self.acc)
        return {"augment_p": used, "ada_r_t": torch.tensor(self.ada.r_t, device=self.acc.device)}

    def run_phase(self, key: tuple, phase: Phase, **inputs: torch.Tensor) -> Metrics:
        """``phase(**inputs)``: eagerly, or replayed as the CUDA graph captured for ``key`` and these input shapes."""
        names = tuple(inputs)
        return self.graphs(key, lambda *values: phase(**dict(zip(names, values))), *inputs.values())

    def discriminator_phase(self, with_r1: tuple[bool, ...], real: torch.Tensor, z: torch.Tensor,
                            real_labels: Optional[torch.Tensor] = None, fake_labels: Optional[torch.Tensor] = None,
                            real_aug: Optional[torch.Tensor] = None,
                            fake_aug: Optional[torch.Tensor] = None) -> Metrics:
        """One update of D per entry of ``with_r1`` (True: with the R1 penalty), all on ``real`` and one fake batch,
        each seen through its augmentation when given (R1 differentiates by the images before it, as ADA does)."""
        train = self.train_cfg
        with torch.no_grad():  # D only ever sees the fake batch detached: it needs no graph
            fake = self.fake_images(z, fake_labels)
            fake = fake if fake_aug is None else augment(fake, fake_aug)
        d_losses, r1_values = [], []
        for r1_now in with_r1:
            self.opt_d.zero_grad(set_to_none=True)
            real_in = real.detach().requires_grad_(True) if r1_now else real
            seen = real_in if real_aug is None else augment(real_in, real_aug)
            real_logits = self.discriminate(seen, real_labels, differentiable_twice=r1_now)
            fake_logits = self.discriminate(fake, fake_labels)
            loss_d = total_d = discriminator_loss(real_logits, fake_logits, train.loss)
            if r1_now:
                r1 = r1_penalty(real_logits, real_in)
                total_d = loss_d + (train.r1_gamma / 2 * train.r1_every) * r1
                r1_values.append(r1.detach())
            self.acc.backward(total_d)
            if self.skip_nonfinite(total_d, self.opt_d):
                continue
            self.opt_d.step()
            d_losses.append(loss_d.detach())
        metrics = {
            "loss_d": torch.stack(d_losses).mean() if d_losses else loss_d.detach(),
            "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
        }
        if train.r1_gamma > 0:  # NaN on iterations without an R1 update would poison the average: 0 there
            metrics["r1"] = torch.stack(r1_values).mean() if r1_values else torch.zeros((), device=self.acc.device)
        if self.ada is not None:  # ADA's overfitting signal, E[sign D(real)]
            metrics["d_real_sign"] = torch.sign(real_logits.detach().float()).mean()
        return metrics

    def generator_phase(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None,
                        fake_aug: Optional[torch.Tensor] = None) -> Metrics:
        """One update of G on latents ``z`` (and labels), D seeing the images through their augmentation when given;
        D's parameters need no gradient, and D's DDP wrapper must not wait for one."""
        train = self.train_cfg
        self.opt_g.zero_grad(set_to_none=True)
        with frozen(self.D), self.acc.no_sync(self.D):
            fake = self.fake_images(z, labels)
            seen = fake if fake_aug is None else augment(fake, fake_aug)
            loss_g = total_g = generator_loss(self.discriminate(seen, labels), train.loss)
            metrics = {"loss_g": loss_g.detach()}
            if self.mode_seeking is not None:  # a pair's weight is its class's (one label per pair)
                per_pair = mode_seeking_penalty(fake, z)
                weights = self.mode_seeking if labels is None else self.mode_seeking[labels[0::2]]
                total_g = loss_g + (weights * per_pair).mean()
                metrics["mode_seeking"] = per_pair.mean().detach()
        self.acc.backward(total_g)
        if not self.skip_nonfinite(total_g, self.opt_g):
            self.opt_g.step()
        return metrics

    def fake_images(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """G's training forward pass: images for latents ``z`` (and class labels)."""
        return self.g_forward(z) if labels is None else self.g_forward(z, labels)

    def discriminate(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                     differentiable_twice: bool = False) -> torch.Tensor:
        """D's logits; ``differentiable_twice`` for the R1 penalty, whose gradient differentiates them twice."""
        forward = self.d_forward_twice_differentiable if differentiable_twice else self.d_forward
        return forward(images) if labels is None else forward(images, labels)

    @torch.no_grad()
    def update_ema(self, t: int) -> None:
        """ema = decay * ema + (1 - decay) * weights after the t-th generator update (t from 0); buffers are copied."""
        if self.ema is None:
            return
        decay = self.train_cfg.ema_decay
        if self.train_cfg.ema_warmup:
            decay = min(decay, (1 + t) / (10 + t))
        source = self.acc.unwrap_model(self.G)
        torch._foreach_lerp_(list(self.ema.parameters()), list(source.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.ema.buffers(), source.buffers()):
            mine.copy_(theirs)

    def skip_nonfinite(self, loss: torch.Tensor, optimizer) -> bool:
        """Under ``train.nonfinite=skip``: drop an update whose loss is NaN/Inf on any process (one sync)."""
        if self.train_cfg.nonfinite != "skip":
            return False
        bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if self.acc.reduce(bad, reduction="sum").item() == 0:
            return False
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.log.warning("step %d: non-finite loss, update skipped (%d so far)", self.iteration + 1,
                         self.skipped_updates)
        return True


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


class PendingMetrics:
    """The metrics of the steps since the last reduction, kept on the device: ``reduce`` averages them over
    processes and steps in one host sync.

    The other half of the non-finite policy: under ``train.nonfinite=stop``, ``reduce`` stops training with the
    first step whose loss is NaN/Inf (the trainer reduces before every checkpoint, so none holds its weights).
    """

    def __init__(self, accelerator: Accelerator, nonfinite: str, run_dir: Path):
        self.acc, self.nonfinite, self.run_dir = accelerator, nonfinite, run_dir
        self.steps: list[tuple[int, Metrics]] = []  # (step, metrics)

    def add(self, step: int, metrics: Metrics) -> None:
        self.steps.append((step, metrics))

    def __len__(self) -> int:
        return len(self.steps)

    def reduce(self, consume: bool = True) -> dict[str, float]:
        """The pending metrics averaged over processes and steps ({} when none); ``consume``: forget them."""
        if not self.steps:
            return {}
        steps = [s for s, _ in self.steps]
        keys = list(self.steps[0][1])
        local = torch.stack([torch.stack([m[k].float() for k in keys]) for _, m in self.steps])
        per_step = self.acc.reduce(local, reduction="mean").cpu()
        if consume:
            self.steps.clear()
        finite = torch.isfinite(per_step[:, [keys.index("loss_d"), keys.index("loss_g")]]).all(dim=1)
        if self.nonfinite == "stop" and not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            values = ", ".join(f"{k}={per_step[i, j].item():.4g}" for j, k in enumerate(keys) if k.startswith("loss"))
            raise TrainingError(f"non-finite loss at step {steps[i]} ({values}); stopped before any checkpoint "
                                f"held it, the newest checkpoint is {ckpt.find_latest(self.run_dir)} "
                                "(train.nonfinite=skip skips such updates instead)")
        return dict(zip(keys, per_step.mean(0).tolist()))
