"""Typed, validated configuration: dataclass sections loaded from YAML, then dotted overrides.

Precedence: dataclass defaults < YAML file (and the files it names as ``base``) < ``key=value``
arguments. Every field is documented once, here, in its ``help`` metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..errors import ConfigError, MednistGanError

MEDNIST_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/MedNIST.tar.gz"
MEDNIST_MD5 = "0bc7306e7427e00ad1c5526a6677552d"
MEDNIST_CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
MAX_YAML_BYTES = 1 << 20  # a config or sweep file is a few KiB
MAX_YAML_VALUES = 100_000  # values a YAML document may stand for, each use of an alias counted again
FOLDER_NAME_RULE = "not empty, no '/', '\\' or NUL, not starting with '.'"  # a class folder's name


def _f(default: Any, help: str, architecture: bool = False, **kw: Any) -> Any:
    """A documented config field; ``architecture`` marks model keys that change the networks' parameters."""
    metadata = {"help": help, "architecture": architecture}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class DataConfig:
    root: Optional[str] = _f(None, "MedNIST folder holding <class_name>/*.jpeg; null = the small sample shipped in the package")
    classes: list[str] = _f(["Hand"], "class folders to train on: one = an unconditional generator (the bundle's), several "
                            "(or [all]: the six MedNIST classes) = one class-conditional generator of (latents, labels) "
                            "with model.arch=resnet, classes sampled evenly (or as data.class_weights says)")
    class_weights: dict[str, float] = _f({}, "a class-conditional run: relative weights of the classes in the real batches "
                                         "D sees and the labels G generates, e.g. {Hand: 3} gives Hand 3 times the "
                                         "share of each other class (a hard class gets more of the updates); a class "
                                         "not named weighs 1; {} = classes sampled evenly")
    download: bool = _f(False, "download and verify MedNIST.tar.gz into root when the class folder is missing")
    url: str = _f(MEDNIST_URL, "where data.download fetches MedNIST.tar.gz from")
    md5: str = _f(MEDNIST_MD5, "published MD5 of MedNIST.tar.gz; the download is refused when it differs")
    limit: Optional[int] = _f(None, "use only the first N images (sorted by name); null = all")
    augment: bool = _f(True, "random rotation/flip/zoom as in the bundle, batched on the training device")
    cache_dir: Optional[str] = _f("~/.cache/mednist_gan", "where decoded image tensors are cached; null = no disk cache")
    bad_files: Literal["error", "skip"] = _f("error", "an unreadable or wrongly sized image: stop with an error, or skip it with a warning")

    def check(self) -> None:
        _require(self.limit is None or self.limit >= 1, "data.limit", self.limit, "an integer >= 1 or null")
        _require(bool(self.classes), "data.classes", self.classes, "a list of class folder names")
        bad = next((name for name in self.classes if not plain_folder_name(name)), None)
        _require(bad is None, "data.classes", self.classes, f"class folder names ({FOLDER_NAME_RULE}): {_short(bad)} is not one")
        _require(len(set(self.classes)) == len(self.classes), "data.classes", self.classes, "each class once")
        _require(self.classes == ["all"] or "all" not in self.classes, "data.classes", self.classes,
                 "[all] alone, or class folder names")
        for name, weight in self.class_weights.items():
            key = f"data.class_weights.{name}"
            _require(len(self.class_names) > 1, key, weight, "nothing: class weights need several data.classes")
            _require(name in self.class_names, key, weight, f"a class of data.classes ({', '.join(self.class_names)})")
            _require(0 < weight < math.inf, key, weight, "a weight > 0")

    @property
    def class_names(self) -> list[str]:
        """The class folders, with [all] spelled out."""
        return list(MEDNIST_CLASSES) if self.classes == ["all"] else list(self.classes)

    @property
    def sampling_weights(self) -> Optional[list[float]]:
        """Each class's weight from ``class_weights``, in label order; None: classes sampled evenly."""
        if not self.class_weights:
            return None
        return [self.class_weights.get(name, 1.0) for name in self.class_names]


@dataclass(frozen=True)
class ModelConfig:
    """The networks. Only keys marked ``architecture`` change the parameters; a checkpoint resumes into the same ones."""

    arch: Literal["monai", "resnet"] = _f("monai", "networks: 'monai' = MONAI's Generator/Discriminator (the g_* and d_* keys), "
                                          "'resnet' = residual generator + spectrally normalised residual discriminator "
                                          "(the resnet_* keys; docs/models.md)", architecture=True)
    latent_size: int = _f(64, "length of the generator's latent vector", architecture=True)
    start_shape: list[int] = _f([64, 8, 8], "generator: shape the latent is projected to (C, H, W)", architecture=True)
    g_channels: list[int] = _f([32, 16, 8, 1], "generator: output channels of each layer", architecture=True)
    g_strides: list[int] = _f([2, 2, 2, 1], "generator: stride of each layer", architecture=True)
    image_shape: list[int] = _f([1, 64, 64], "discriminator input shape (C, H, W)", architecture=True)
    d_channels: list[int] = _f([8, 16, 32, 64, 1], "discriminator: output channels of each layer", architecture=True)
    d_strides: list[int] = _f([2, 2, 2, 2, 1], "discriminator: stride of each layer", architecture=True)
    d_num_res_units: int = _f(1, "discriminator: residual units per layer", architecture=True)
    d_kernel_size: int = _f(5, "discriminator: convolution kernel size", architecture=True)
    d_dropout: float = _f(0.25, "discriminator dropout (MONAI's default; model.arch=monai)")
    classes: list[str] = _f([], "class names of a class-conditional generator, in label order: set from data.classes when it "
                            "names several; empty = unconditional", architecture=True)
    resnet_g_channels: int = _f(32, "model.arch=resnet: generator width; its stages have 16, 8, 4, 2, 1 times this many "
                                "channels from 4x4 to 64x64", architecture=True)
    resnet_d_channels: int = _f(32, "model.arch=resnet: discriminator width; its stages have 1, 2, 4, 8, 16 times this "
                                "many channels from 64x64 down to 4x4", architecture=True)
    resnet_mbstd: int = _f(0, "model.arch=resnet: minibatch standard deviation in the discriminator (StyleGAN's feature "
                           "against mode collapse): images in groups of this many, D sees how alike each group's features "
                           "are (a class-conditional D: the features of each class's images within the group, so groups "
                           "need several images per class); 0 = off", architecture=True)
    resnet_d_sn: bool = _f(True, "model.arch=resnet: spectral normalisation in every discriminator layer (SNGAN); false "
                           "leaves the R1 penalty (train.r1_gamma) as D's only constraint, as StyleGAN does",
                           architecture=True)

    @classmethod
    def from_record(cls, data: dict, source: Any) -> "ModelConfig":
        """The model section recorded in ``source`` (a checkpoint.json, an export.json): keys that have since moved out
        are dropped, keys this version does not know (a newer one wrote them) are ignored with a ConfigWarning."""
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if f"model.{k}" not in LEGACY_KEYS}
        return _from_record(cls, data, "model.", source)

    @classmethod
    def architecture_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("architecture")]

    def check(self) -> None:
        _require(self.latent_size >= 1, "model.latent_size", self.latent_size, "an integer >= 1")
        _require(len(self.g_channels) == len(self.g_strides), "model.g_strides", self.g_strides,
                 f"as many entries as model.g_channels ({len(self.g_channels)})")
        _require(len(self.d_channels) == len(self.d_strides), "model.d_strides", self.d_strides,
                 f"as many entries as model.d_channels ({len(self.d_channels)})")
        _require(len(self.start_shape) == 3, "model.start_shape", self.start_shape, "three integers (C, H, W)")
        _require(len(self.image_shape) == 3, "model.image_shape", self.image_shape, "three integers (C, H, W)")
        _require(0.0 <= self.d_dropout < 1.0, "model.d_dropout", self.d_dropout, "a number in [0, 1)")
        _require(self.d_kernel_size >= 1, "model.d_kernel_size", self.d_kernel_size, "an integer >= 1")
        for key in ("resnet_g_channels", "resnet_d_channels"):
            _require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        _require(self.resnet_mbstd == 0 or self.resnet_mbstd >= 2, "model.resnet_mbstd", self.resnet_mbstd,
                 "0 (off) or a group size >= 2")
        _require(not self.classes or self.arch == "resnet", "model.arch", self.arch,
                 "'resnet' for a class-conditional generator (several data.classes): MONAI's networks take no labels")
        if self.arch == "resnet":
            c, h, w = self.image_shape
            _require(c == 1 and h == w and h >= 8 and h & (h - 1) == 0, "model.image_shape", self.image_shape,
                     "[1, S, S] with S a power of two >= 8 for model.arch=resnet")


@dataclass(frozen=True)
class OptimConfig:
    g_lr: float = _f(2e-4, "generator Adam learning rate")
    d_lr: float = _f(2e-4, "discriminator Adam learning rate")
    betas: list[float] = _f([0.5, 0.999], "Adam betas for both optimizers")
    foreach: Optional[bool] = _f(None, "Adam's multi-tensor implementation; null = PyTorch's choice (same numerics)")
    warmup_steps: int = _f(0, "learning rates rise linearly from lr/warmup_steps to lr over this many iterations; 0 = no warm-up")
    decay: Literal["none", "linear", "cosine"] = _f("none", "learning-rate decay after the warm-up, down to lr * final_lr_ratio at the last iteration")
    final_lr_ratio: float = _f(0.0, "with optim.decay: the last iteration's learning rate as a fraction of lr")

    @property
    def scheduled(self) -> bool:
        return self.warmup_steps > 0 or self.decay != "none"

    def check(self) -> None:
        for key in ("g_lr", "d_lr"):
            value = getattr(self, key)
            _require(value > 0, f"optim.{key}", value, "a number > 0")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0.0 <= self.final_lr_ratio <= 1.0, "optim.final_lr_ratio", self.final_lr_ratio, "a number in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
                 "two numbers in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(50, "passes over the data")
    max_steps: Optional[int] = _f(None, "stop after this many iterations (one D phase + one G update); null = no limit")
    batch_size: int = _f(600, "global batch of real images per iteration, split across processes")
    d_train_steps: int = _f(5, "discriminator updates per iteration, all on the same real and fake batch")
    g_train_steps: int = _f(1, "generator updates per iteration, each on fresh latents")
    g_batch_size: Optional[int] = _f(None, "global latent batch of each generator update; null = train.batch_size")
    loss: Literal["bce", "ns", "hinge"] = _f("bce", "GAN loss: 'bce' = the bundle's (mean of the real and fake BCE), 'ns' = non-saturating "
                                             "logistic (softplus, summed as in StyleGAN), 'hinge'")
    r1_gamma: float = _f(0.0, "R1 gradient penalty on real images, gamma/2 * E|grad_x D(x)|^2; 0 = off")
    r1_every: int = _f(1, "apply R1 every N discriminator updates, scaled by N (lazy regularisation)")
    mode_seeking: float = _f(0.0, "weight of the mode-seeking term in G's loss (Mao et al. 2019, MSGAN): the latents of each "
                              "generator batch come in pairs (2k, 2k+1) of one class, and 1 / (mean |G(z_a) - G(z_b)| / mean "
                              "|z_a - z_b| + 0.01), averaged over pairs, is added with this weight, so that different latents "
                              "of one class do not end in one image; 0 = off")
    ema_decay: Optional[float] = _f(None, "exponential moving average of the generator weights, updated after every generator "
                                    "update; samples, evaluation and export use it; null = off")
    ema_warmup: bool = _f(False, "EMA decay min(ema_decay, (1 + t) / (10 + t)) at the t-th generator update, so that "
                          "early averages do not drag the initial weights along")
    precision: Literal["no", "fp16", "bf16"] = _f("no", "mixed precision handed to Accelerate")
    seed: int = _f(0, "seed of weights, shuffling, latents and augmentation; dropout uses seed + process index")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms: bitwise repeatable on the same machine")
    detect_anomaly: bool = _f(False, "autograd anomaly detection (slow; debugging only)")
    resume: str = _f("auto", "'auto' = newest complete checkpoint in run_dir, 'none', or a checkpoint path")
    log_every: int = _f(10, "iterations between progress/log lines")
    nonfinite: Literal["stop", "skip"] = _f("stop", "a NaN/Inf loss: stop (before any checkpoint holds it) or skip that update (checks every step)")
    collective_timeout_s: int = _f(600, "seconds a process waits for the others in a collective before giving up (a dead rank)")

    def check(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "an integer >= 1 or null")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.d_train_steps >= 1, "train.d_train_steps", self.d_train_steps, "an integer >= 1")
        _require(self.g_train_steps >= 1, "train.g_train_steps", self.g_train_steps, "an integer >= 1")
        _require(self.g_batch_size is None or self.g_batch_size >= 1, "train.g_batch_size", self.g_batch_size, "an integer >= 1 or null")
        _require(self.r1_gamma >= 0, "train.r1_gamma", self.r1_gamma, "a number >= 0")
        _require(self.r1_every >= 1, "train.r1_every", self.r1_every, "an integer >= 1")
        _require(self.mode_seeking >= 0, "train.mode_seeking", self.mode_seeking, "a number >= 0")
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "train.ema_decay", self.ema_decay, "a number in (0, 1) or null")
        _require(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        _require(self.collective_timeout_s >= 1, "train.collective_timeout_s", self.collective_timeout_s, "an integer >= 1")
        _require(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer in 0..{MAX_SEED}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process runs: speed settings that change neither the parameters nor the recipe."""

    channels_last: bool = _f(True, "channels_last memory format for both networks (same results, faster convolutions)")
    num_threads: Optional[int] = _f(None, "intra-op CPU threads per process; null = PyTorch's default")
    keep_host_memory: bool = _f(True, "keep freed host memory in the process (glibc malloc without mmap and trimming) instead "
                                "of page-faulting large tensors back in every step; same results, CPU steps faster, ~20% more resident memory")
    cpu_mask_dropout: bool = _f(True, "on CPU, draw dropout masks as rand >= p (same distribution, faster than PyTorch's CPU "
                                "bernoulli; other masks)")
    cuda_graphs: bool = _f(True, "on one CUDA GPU: run each iteration's discriminator phase and generator update as CUDA graphs "
                           "(captured after 3 eager runs of each), without per-kernel launch overhead; runs eagerly, and says "
                           "why, under train.precision=fp16, train.nonfinite=skip, train.detect_anomaly or several processes")
    fused_adam: bool = _f(True, "on CUDA: Adam's fused kernel, one launch per optimizer step (the same update up to rounding)")
    compile: bool = _f(False, "torch.compile (inductor) the networks' training forward passes, fusing their small memory-bound "
                       "kernels (normalisations, activations) into fewer, larger ones; compiled during the first iterations "
                       "(before any CUDA graph is captured); the R1 penalty's forward runs eagerly (compiled code has no "
                       "double backward); same results up to floating-point rounding")
    tf32: bool = _f(True, "on Ampere or newer GPUs: TensorFloat-32 in fp32 convolutions and matrix products (PyTorch's own "
                    "default allows it for convolutions only); false = strict fp32")

    def check(self) -> None:
        _require(self.num_threads is None or self.num_threads >= 1, "runtime.num_threads", self.num_threads, "an integer >= 1 or null")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: Optional[int] = _f(None, "save a checkpoint every N iterations; null = only per epoch and at the end")
    every_epochs: Optional[int] = _f(1, "save a checkpoint every N epochs; null = never per epoch")
    keep: int = _f(3, "newest complete checkpoints kept; older ones are removed after a newer one is complete")

    def check(self) -> None:
        _require(self.every_steps is None or self.every_steps >= 1, "checkpoint.every_steps", self.every_steps, "an integer >= 1 or null")
        _require(self.every_epochs is None or self.every_epochs >= 1, "checkpoint.every_epochs", self.every_epochs, "an integer >= 1 or null")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass(frozen=True)
class ExportConfig:
    at_end: bool = _f(True, "export the generator (model.pt, TorchScript, MONAI bundle) when training ends")
    onnx: bool = _f(False, "also write mednist_gan.onnx (needs the onnx package)")

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: Optional[int] = _f(None, "score the generator (FMD, FD-SSL, KID, precision/recall, density/coverage, "
                                                 "MS-SSIM diversity) every N epochs; null = never")
    every_steps: Optional[int] = _f(None, "score the generator every N iterations; null = never")
    num_samples: int = _f(1000, "generated and real (training) images per evaluation")
    keep_best: bool = _f(True, "export the generator with the lowest eval.best_metric so far to <run_dir>/best")
    best_metric: Literal["fd_ssl", "fmd", "kid", "kid_ssl"] = _f(
        "fd_ssl", "the score (lower is better) that picks the generator kept in <run_dir>/best: fd_ssl (the self-supervised "
        "encoder's Frechet distance, the space that agrees with the eye, docs/quality.md), fmd, kid or kid_ssl")
    classifier: Optional[str] = _f(None, "classifier weights (FMD, KID); null = the classifier shipped in the package")
    encoder: Optional[str] = _f(None, "self-supervised encoder weights (FD-SSL, precision/recall, density/coverage); "
                                      "null = the encoder shipped in the package")

    def check(self) -> None:
        _require(self.every_epochs is None or self.every_epochs >= 1, "eval.every_epochs", self.every_epochs, "an integer >= 1 or null")
        _require(self.every_steps is None or self.every_steps >= 1, "eval.every_steps", self.every_steps, "an integer >= 1 or null")
        _require(self.num_samples >= 2, "eval.num_samples", self.num_samples, "an integer >= 2")


@dataclass(frozen=True)
class LogConfig:
    tracker: Literal["none", "wandb", "tensorboard", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio"] = _f(
        "none", "experiment tracker (any of Accelerate's), main process only; sample grids go to those that log images; "
        "a tracker that is not installed is an error (pip install \"mednist-gan[<tracker>]\"); MLflow writes to "
        "<log.dir>/mlflow.db unless MLFLOW_TRACKING_URI says otherwise")
    project: str = _f("mednist-gan", "W&B project / TensorBoard run group / MLflow experiment; WANDB_PROJECT overrides")
    entity: Optional[str] = _f(None, "W&B entity (team or user); WANDB_ENTITY overrides")
    run_name: Optional[str] = _f(None, "tracker run name; null = the config's name")
    group: Optional[str] = _f(None, "W&B group, e.g. to gather the runs of a sweep")
    tags: list[str] = _f([], "W&B tags")
    mode: Literal["online", "offline", "disabled"] = _f("offline", "W&B mode; WANDB_MODE overrides; sync offline runs later with `wandb sync`")
    dir: Optional[str] = _f(None, "where the tracker writes; null = <run_dir>/tracker; WANDB_DIR overrides for W&B")
    online_timeout: int = _f(30, "seconds W&B may take to start online before falling back to offline")
    sample_every: Optional[int] = _f(50, "log a grid of samples from a fixed latent batch every N iterations (and at the end); null = only at the end")
    num_samples: int = _f(64, "images in each sample grid")
    artifact: bool = _f(True, "upload the exported generator files as a W&B artifact at the end")

    def check(self) -> None:
        _require(self.online_timeout >= 1, "log.online_timeout", self.online_timeout, "an integer >= 1")
        _require(self.sample_every is None or self.sample_every >= 1, "log.sample_every", self.sample_every, "an integer >= 1 or null")
        _require(1 <= self.num_samples <= 1024, "log.num_samples", self.num_samples, "an integer in [1, 1024]")


@dataclass(frozen=True)
class Config:
    name: str = _f("run", "run name; defaults to the config file's name")
    run_dir: Optional[str] = _f(None, "where the run writes everything; null = runs/<name>")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir if self.run_dir is not None else os.path.join("runs", self.name))

    def check(self) -> None:
        names = self.data.class_names
        derived = names if len(names) > 1 else []
        _require(self.model.classes in ([], derived), "model.classes", self.model.classes,
                 f"nothing: it is set from data.classes ({derived})")
        _require(bool(self.name), "name", self.name, "a non-empty string")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# Keys that moved (new place) or were removed (None). Config files and overrides that use them still load,
# with a warning; checkpoints that recorded them still resume and export (``ModelConfig.from_record``).
LEGACY_KEYS: dict[str, Optional[str]] = {
    "model.cpu_mask_dropout": "runtime.cpu_mask_dropout",
    "model.cpu_phase_split": None,  # gained under 3% end to end (docs/benchmarks.md)
    "train.channels_last": "runtime.channels_last",
    "train.num_threads": "runtime.num_threads",
    "train.keep_host_memory": "runtime.keep_host_memory",
    "data.class_name": "data.classes",  # one class name -> a list of one
}


class ConfigWarning(UserWarning):
    """A config that still loads but should be updated."""


def _legacy(old: str, value: Any) -> Optional[tuple[str, Any]]:
    """Where a moved key's value goes now (with a warning), or None for a removed key."""
    new = LEGACY_KEYS[old]
    if new is None:
        warnings.warn(f"config key {old} was removed (it changed nothing but speed); ignoring it", ConfigWarning, 3)
        return None
    warnings.warn(f"config key {old} is now {new}; please rename it", ConfigWarning, 3)
    return new, [value] if new == "data.classes" and isinstance(value, str) else value


def _move_legacy_keys(data: dict) -> None:
    """Moved keys of one config file to their new place (a file that also sets the new key keeps its value)."""
    for old in LEGACY_KEYS:
        section, key = old.split(".")
        if not isinstance(data.get(section), dict) or key not in data[section]:
            continue
        moved = _legacy(old, data[section].pop(key))
        if moved is not None:
            new_section, new_key = moved[0].split(".")
            data.setdefault(new_section, {}).setdefault(new_key, moved[1])


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value: Any) -> str:
    """``repr(value)`` cut to 80 characters, for error messages."""
    return _clip(repr(value))


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_short(value)} is not allowed: expected {expected}")


def plain_folder_name(name: object) -> bool:
    """Whether ``name`` can only name one folder inside another (a class folder's name): FOLDER_NAME_RULE."""
    return isinstance(name, str) and name != "" and not name.startswith(".") and not any(c in name for c in "/\\\0")


def check_class_name(name: object, what: str, error: type[MednistGanError] = ConfigError) -> None:
    """Raise ``error`` (``<what>: class name '...' is not allowed: expected a plain folder name ...``) unless
    ``name`` is a plain folder name."""
    if not plain_folder_name(name):
        raise error(f"{what}: class name {_short(name)} is not allowed: expected a plain folder name ({FOLDER_NAME_RULE})")


# ----------------------------------------------------------------------------- loading

class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that StrictLoader will not load."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, a node that contains itself, and documents
    that stand for more than MAX_YAML_VALUES values once their aliases are expanded (a "billion laughs")."""

    def get_single_node(self) -> Optional[yaml.Node]:
        node = super().get_single_node()
        if node is not None:
            _count_values(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then keys of its own may override base's
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _Refused(problem=f"key {_short(key)} appears twice in one mapping",
                                   problem_mark=key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base class refuses it
                pass
        return super().construct_mapping(node, deep)


def _count_values(node: yaml.Node, counted: dict[int, int], open_: set[int]) -> int:
    """The values ``node`` stands for, each use of an alias counted again; a refusal past MAX_YAML_VALUES."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_:
        raise _Refused(problem="an alias refers to a node that contains it", problem_mark=node.start_mark)
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else ()
    total = 1
    for child in children:
        total += _count_values(child, counted, open_)
        if total > MAX_YAML_VALUES:
            raise _Refused(problem=f"more than {MAX_YAML_VALUES} values once aliases are expanded",
                           problem_mark=node.start_mark)
    open_.discard(id(node))
    counted[id(node)] = total
    return total


def read_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file's content ({} when empty), read with StrictLoader. A file that cannot be read, is larger than
    MAX_YAML_BYTES, is not UTF-8 or is not acceptable YAML is a one-line ConfigError naming ``what``, the file
    and where possible the line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{what} {path}: larger than {MAX_YAML_BYTES >> 20} MiB, the most a YAML file may hold")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{what} {path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=StrictLoader) or {}
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _clip(getattr(exc, "problem", None) or str(exc).splitlines()[0], 200)
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{what} {path}{where}: {kind}{problem}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read one YAML file, merging the file it names under ``base`` (relative to it) underneath."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    _move_legacy_keys(data)  # file by file, so that a file's old key overrides its base's new one
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base: expected a path (a string), got {_short(base)}")
    return _merge(_read_yaml(path.parent / base, seen + (path.resolve(),)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# YAML 1.1 reads these words as booleans; on the command line they stay words (train.precision=no),
# and boolean keys accept them as booleans.
_YAML_BOOL_WORDS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def _parse_override(arg: str) -> tuple[list[str], Any]:
    key, sep, raw = arg.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {_short(arg)} is not of the form key=value (e.g. train.epochs=5)")
    if raw.lower() in _YAML_BOOL_WORDS:
        return key.split("."), raw
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw != "" else ""
    except _Refused as exc:
        raise ConfigError(f"override {_short(arg)}: {exc.problem}") from None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.split("."), value


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where lossless (int -> float, '1e-4' -> float)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "no" in allowed:  # `precision: no` in a YAML file reads as False
            value = {False: "no", True: "yes"}[value]
        if value not in allowed:
            raise ConfigError(f"{key}={_short(value)} is not allowed: expected one of {', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={_short(value)} has the wrong type: expected a mapping of {key_tp.__name__} to "
                              f"{value_tp.__name__}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{_clip(str(k))}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_short(value)} has the wrong type: expected a list of {item_tp.__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _YAML_BOOL_WORDS:
            return _YAML_BOOL_WORDS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    if value is None:
        raise ConfigError(f"{key}=null is not allowed: expected {tp.__name__}")
    raise ConfigError(f"{key}={_short(value)} has the wrong type: expected {tp.__name__}")


def _build(cls: type, data: dict, prefix: str, unknown: Optional[list[str]] = None) -> Any:
    """``cls`` from a mapping of its keys; an unknown key is an error, or (a record) appended to ``unknown``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{_clip(str(key))}"
        if key not in names:
            if unknown is not None:
                unknown.append(full)
                continue
            close = difflib.get_close_matches(str(key), names, n=1)
            valid = [f"{prefix}{n}" for n in names]
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key {full!r}: {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} must be a section (a mapping of keys), got {_short(value)}")
            kwargs[key] = _build(tp, value, f"{full}.", unknown)
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (),
                values: Optional[dict[str, Any]] = None) -> Config:
    """Load a config file (if any), apply ``key=value`` overrides and validate the result.

    ``values``: dotted keys set to Python values after the overrides (a sweep trial's parameters), so that
    they need no round trip through text.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        data.setdefault("name", path.stem)
    settings = [(arg, *_parse_override(arg)) for arg in overrides]
    settings += [(f"{key}={value!r}", key.split("."), value) for key, value in (values or {}).items()]
    for arg, keys, value in settings:
        if ".".join(keys) in LEGACY_KEYS:  # an old name on the command line still overrides the files
            moved = _legacy(".".join(keys), value)
            if moved is None:
                continue
            keys, value = moved[0].split("."), moved[1]
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {_short(arg)}: {_clip(k)} is a value, not a section")
            node = child
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    cfg.check()
    names = cfg.data.class_names
    if len(names) > 1:  # the generator learns these classes, in this order: its labels are their indices
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, classes=names))
        cfg.model.check()
    return cfg


def config_from_record(data: dict, source: Any) -> Config:
    """The whole config recorded in ``source`` (a checkpoint.json, an export.json), as recorded: not checked
    again. Keys of earlier versions go to their new place; keys this version does not know (a newer one wrote
    them) are ignored with a ConfigWarning."""
    if isinstance(data, dict):
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        with warnings.catch_warnings():  # nobody can rename a key in a record
            warnings.simplefilter("ignore", ConfigWarning)
            _move_legacy_keys(data)
    return _from_record(Config, data, "", source)


def _from_record(cls: type, data: Any, prefix: str, source: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the recorded {prefix.rstrip('.') or 'config'} is not a mapping of keys")
    unknown: list[str] = []
    try:
        cfg = _build(cls, data, prefix, unknown)
    except ConfigError as exc:
        raise ConfigError(f"{source}: recorded {exc}") from None
    if unknown:  # stacklevel 1: the same record read twice in a process warns once
        warnings.warn(f"{source}: ignoring config keys this version does not know (a newer version wrote them): "
                      f"{_clip(', '.join(unknown), 200)}", ConfigWarning)
    return cfg


def describe_fields() -> str:
    """Every key with its default and help, for ``mednist-gan config-help``."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}\n    {f.metadata.get('help', '')}")

    walk(Config, "")
    return "\n".join(lines)
