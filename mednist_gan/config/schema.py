"""The config's sections: frozen dataclasses whose fields carry a one-line help, each section's checks, and configs
read back from records (checkpoint.json, export.json); the keys that moved are in ``legacy.py``.

Precedence: dataclass defaults < YAML file (and the files it names as ``base``) < ``key=value`` arguments
(``load.load_config``). Every field is documented once, here; longer explanations are in docs/.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from ..errors import ConfigError, MednistGanError
from .coerce import build_section, clip_text, short_repr
from .legacy import LEGACY_KEYS, ConfigWarning, move_legacy_keys

MEDNIST_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/MedNIST.tar.gz"
MEDNIST_MD5 = "0bc7306e7427e00ad1c5526a6677552d"
MEDNIST_CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
MAX_SEED = 2**32 - 1  # NumPy's seeds are 32-bit
FOLDER_NAME_RULE = "not empty, no '/', '\\' or NUL, not starting with '.'"  # a class folder's name
ResizeMode = Literal["center-crop", "pad", "stretch"]  # data.resize and prepare-data --resize
Interpolation = Literal["area", "bilinear", "bicubic", "nearest"]
TrackerName = Literal["none", "wandb", "tensorboard", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
                        "trackio"]


def walk_keys(section: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every key of a config (or one section) in order, as (``section.key``, its field, its value); a key whose value
    is a mapping (``data.class_weights``, ``data.intensity``) is one key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from walk_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def documented(default: Any, help: str, architecture: bool = False, **kwargs: Any) -> Any:
    """A config field with its one-line help; ``architecture`` marks model keys that change the networks' parameters."""
    metadata = {"help": help, "architecture": architecture}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={short_repr(value)} is not allowed: expected {expected}")


def check_per_class(key: str, mapping: dict[str, float], names: list[str], zero: bool, expected: str) -> None:
    for name, value in mapping.items():  # class names of several ``names`` -> finite numbers > 0 (``zero``: >= 0)
        _require(len(names) > 1, f"{key}.{name}", value, "nothing: per-class values need several data.classes")
        _require(name in names, f"{key}.{name}", value, f"a class of data.classes ({', '.join(names)})")
        _require((value >= 0 if zero else value > 0) and value < math.inf, f"{key}.{name}", value, expected)


@dataclass(frozen=True)
class DataConfig:
    root: Optional[str] = documented(None, "MedNIST folder holding <class_name>/*.jpeg; null = the shipped sample")
    classes: list[str] = documented(
        ["Hand"], "class folders to train on; several (or [all]) = one class-conditional generator (docs/models.md)")
    class_weights: dict[str, float] = documented(
        {}, "a class-conditional run's class shares, e.g. {Hand: 3}; a class not named weighs 1; {} = even")
    download: bool = documented(False, "download and verify MedNIST.tar.gz into root when the class folder is missing")
    url: str = documented(MEDNIST_URL, "where data.download fetches MedNIST.tar.gz from")
    md5: str = documented(MEDNIST_MD5, "published MD5 of MedNIST.tar.gz; the download is refused when it differs")
    limit: Optional[int] = documented(None, "use only the first N images (sorted by name); null = all")
    augment: bool = documented(True, "random rotation/flip/zoom as in the bundle, batched on the training device")
    cache_dir: Optional[str] = documented("~/.cache/mednist_gan", "where decoded images are cached; null = no cache")
    bad_files: Literal["error", "skip"] = documented(
        "error", "an unreadable or wrongly sized image: stop with an error, or skip it with a warning")
    resize: Optional[ResizeMode] = documented(
        None, "images of any size (and PNG 16-bit, TIFF, DICOM) to the model's by center-crop, pad or stretch, as "
        "prepare-data does; null = JPEG/PNG at the model's size only")
    interpolation: Interpolation = documented("area", "how data.resize scales: area, bilinear, bicubic or nearest")
    intensity: Optional[dict[str, float]] = documented(
        None, "{min: -1000, max: 1000}: clip values to this window (e.g. CT Hounsfield units) before each image is "
        "scaled to [0, 1]; null = each image from its minimum to its maximum")

    def check(self) -> None:
        _require(self.limit is None or self.limit >= 1, "data.limit", self.limit, "an integer >= 1 or null")
        _require(bool(self.classes), "data.classes", self.classes, "a list of class folder names")
        bad = next((name for name in self.classes if not plain_folder_name(name)), None)
        _require(bad is None, "data.classes", self.classes,
                 f"class folder names ({FOLDER_NAME_RULE}): {short_repr(bad)} is not one")
        _require(len(set(self.classes)) == len(self.classes), "data.classes", self.classes, "each class once")
        _require(self.classes == ["all"] or "all" not in self.classes, "data.classes", self.classes,
                 "[all] alone, or class folder names")
        check_per_class("data.class_weights", self.class_weights, self.class_names, False, "a weight > 0")
        window = self.intensity
        _require(window is None or (set(window) == {"min", "max"} and window["min"] < window["max"]), "data.intensity",
                 window, "{min: LOW, max: HIGH} with LOW < HIGH, or null")

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
    """The networks. Only keys marked ``architecture`` change the parameters; a checkpoint resumes into the same
    ones."""

    arch: Literal["monai", "resnet"] = documented(
        "monai", "networks: 'monai' (the g_*/d_* keys) or 'resnet' (the resnet_* keys; docs/models.md)",
        architecture=True)
    latent_size: int = documented(64, "length of the generator's latent vector", architecture=True)
    start_shape: list[int] = documented([64, 8, 8], "generator: shape the latent is projected to (C, H, W)",
                                        architecture=True)
    g_channels: list[int] = documented([32, 16, 8, 1], "generator: output channels of each layer", architecture=True)
    g_strides: list[int] = documented([2, 2, 2, 1], "generator: stride of each layer", architecture=True)
    image_shape: list[int] = documented([1, 64, 64], "discriminator input shape (C, H, W)", architecture=True)
    d_channels: list[int] = documented([8, 16, 32, 64, 1], "discriminator: output channels of each layer",
                                       architecture=True)
    d_strides: list[int] = documented([2, 2, 2, 2, 1], "discriminator: stride of each layer", architecture=True)
    d_num_res_units: int = documented(1, "discriminator: residual units per layer", architecture=True)
    d_kernel_size: int = documented(5, "discriminator: convolution kernel size", architecture=True)
    d_dropout: float = documented(0.25, "discriminator dropout (MONAI's default; model.arch=monai)")
    classes: list[str] = documented([], "a class-conditional generator's classes in label order: set from data.classes",
                                    architecture=True)
    resnet_g_channels: int = documented(32, "model.arch=resnet: generator width (stages of 16..1 times it)",
                                        architecture=True)
    resnet_d_channels: int = documented(32, "model.arch=resnet: discriminator width (stages of 1..16 times it)",
                                        architecture=True)
    resnet_mbstd: int = documented(0, "model.arch=resnet: group size of D's minibatch standard deviation; 0 = off",
                                   architecture=True)
    resnet_d_sn: bool = documented(True, "model.arch=resnet: spectral normalisation in every discriminator layer",
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

    @classmethod
    def generator_keys(cls) -> list[str]:
        """The architecture keys G's weights depend on (an export's model.pt holds G alone)."""
        return [k for k in cls.architecture_keys() if not k.startswith(("d_", "resnet_d_", "resnet_mbstd"))]

    def unread_keys(self) -> set[str]:
        """The keys of the other ``arch``'s networks, which this one does not read."""
        monai = {"start_shape", "g_channels", "g_strides", "d_channels", "d_strides", "d_num_res_units",
                 "d_kernel_size", "d_dropout"}
        resnet = {f.name for f in dataclasses.fields(self) if f.name.startswith("resnet_")}
        return resnet if self.arch == "monai" else monai

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
    g_lr: float = documented(2e-4, "generator Adam learning rate")
    d_lr: float = documented(2e-4, "discriminator Adam learning rate")
    betas: list[float] = documented([0.5, 0.999], "Adam betas for both optimizers")
    warmup_steps: int = documented(0, "iterations of linear learning-rate warm-up from lr/warmup_steps; 0 = none")
    decay: Literal["none", "linear", "cosine"] = documented(
        "none", "learning-rate decay after the warm-up, down to lr * final_lr_ratio at the last iteration")
    final_lr_ratio: float = documented(0.0, "with optim.decay: the last iteration's learning rate as a fraction of lr")

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
    epochs: int = documented(50, "passes over the data")
    max_steps: Optional[int] = documented(None, "stop after N iterations (a D phase + the G updates); null = no limit")
    batch_size: int = documented(600, "global batch of real images per iteration, split across processes")
    d_train_steps: int = documented(5, "discriminator updates per iteration, all on the same real and fake batch")
    g_train_steps: int = documented(1, "generator updates per iteration, each on fresh latents")
    g_batch_size: Optional[int] = documented(None, "global latent batch of each generator update; null = batch_size")
    loss: Literal["bce", "ns", "hinge"] = documented(
        "bce", "GAN loss: 'bce' (the bundle's), 'ns' (non-saturating logistic) or 'hinge' (docs/training.md)")
    r1_gamma: float = documented(0.0, "R1 gradient penalty on real images, gamma/2 * E|grad_x D(x)|^2; 0 = off")
    r1_every: int = documented(1, "apply R1 every N discriminator updates, scaled by N (lazy regularisation)")
    mode_seeking: float = documented(0.0, "weight of MSGAN's mode-seeking term in G's loss (docs/training.md); 0 = off")
    mode_seeking_classes: dict[str, float] = documented({}, "classes' own mode-seeking weights, e.g. {Hand: 0}")
    ema_decay: Optional[float] = documented(
        None, "moving average of the generator's weights, used by samples, evaluation and export; null = off")
    ema_warmup: bool = documented(False, "EMA decay min(ema_decay, (1 + t) / (10 + t)) at the t-th generator update")
    d_augment: Literal["none", "diffaugment", "ada"] = documented(
        "none", "augment every image D sees, real and generated (small data): 'diffaugment' always, 'ada' with an "
        "adaptive probability (docs/training.md)")
    ada_target: float = documented(0.6, "ADA: the E[sign D(real)] its probability steers to (StyleGAN2-ADA's 0.6)")
    ada_images: int = documented(500_000, "ADA: images shown over which its probability can move from 0 to 1")
    ada_interval: int = documented(4, "ADA: iterations between adjustments of its probability")
    precision: Literal["no", "fp16", "bf16"] = documented("no", "mixed precision handed to Accelerate")
    seed: int = documented(0, "seed of weights, shuffling, latents and augmentation; dropout uses seed + process index")
    deterministic: bool = documented(False, "torch.use_deterministic_algorithms: bitwise repeatable on one machine")
    detect_anomaly: bool = documented(False, "autograd anomaly detection (slow; debugging only)")
    resume: str = documented("auto", "'auto' = newest complete checkpoint in run_dir, 'none', or a checkpoint path")
    init_from: Optional[str] = documented(None, "start from these weights with fresh optimizers (fine-tuning): a run "
                                          "folder or checkpoint (G and D), an export or its model.pt (G)")
    nonfinite: Literal["stop", "skip"] = documented(
        "stop", "a NaN/Inf loss: stop (before any checkpoint holds it) or skip that update (checks every step)")
    collective_timeout_s: int = documented(600, "seconds a process waits for the others in a collective (a dead rank)")

    def check(self) -> None:
        _require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps,
                 "an integer >= 1 or null")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.d_train_steps >= 1, "train.d_train_steps", self.d_train_steps, "an integer >= 1")
        _require(self.g_train_steps >= 1, "train.g_train_steps", self.g_train_steps, "an integer >= 1")
        _require(self.g_batch_size is None or self.g_batch_size >= 1, "train.g_batch_size", self.g_batch_size,
                 "an integer >= 1 or null")
        _require(self.r1_gamma >= 0, "train.r1_gamma", self.r1_gamma, "a number >= 0")
        _require(self.r1_every >= 1, "train.r1_every", self.r1_every, "an integer >= 1")
        _require(self.mode_seeking >= 0, "train.mode_seeking", self.mode_seeking, "a number >= 0")
        _require(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, "train.ema_decay", self.ema_decay,
                 "a number in (0, 1) or null")
        _require(self.collective_timeout_s >= 1, "train.collective_timeout_s", self.collective_timeout_s,
                 "an integer >= 1")
        _require(0.0 < self.ada_target < 1.0, "train.ada_target", self.ada_target, "a number in (0, 1)")
        _require(self.ada_images >= 1, "train.ada_images", self.ada_images, "an integer >= 1")
        _require(self.ada_interval >= 1, "train.ada_interval", self.ada_interval, "an integer >= 1")
        _require(0 <= self.seed <= MAX_SEED, "train.seed", self.seed, f"an integer in 0..{MAX_SEED}")


@dataclass(frozen=True)
class RuntimeConfig:
    """How this process runs: speed settings that change neither the parameters nor the recipe (docs/training.md)."""

    channels_last: bool = documented(True, "channels_last memory format for both networks (faster convolutions)")
    num_threads: Optional[int] = documented(None, "intra-op CPU threads per process; null = PyTorch's default")
    keep_host_memory: bool = documented(
        True, "keep freed host memory instead of page-faulting it back every step (~20% more resident memory)")
    cpu_mask_dropout: bool = documented(True, "on CPU, draw dropout masks as rand >= p (faster; other masks)")
    cuda_graphs: bool = documented(True, "on one CUDA GPU: replay each iteration's D phase and G update as CUDA graphs")
    fused_adam: bool = documented(True, "on CUDA: Adam's fused kernel, one launch per optimizer step")
    foreach: Optional[bool] = documented(
        None, "Adam's multi-tensor implementation where it is not fused; null = PyTorch's choice (same numerics)")
    compile: bool = documented(False, "torch.compile (inductor) the networks' training forward passes")
    tf32: bool = documented(True, "on Ampere or newer GPUs: TensorFloat-32 in fp32 convolutions and matrix products")

    def check(self) -> None:
        _require(self.num_threads is None or self.num_threads >= 1, "runtime.num_threads", self.num_threads,
                 "an integer >= 1 or null")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: Optional[int] = documented(
        None, "save a checkpoint every N iterations; null = only per epoch and at the end")
    every_epochs: Optional[int] = documented(1, "save a checkpoint every N epochs; null = never per epoch")
    keep: int = documented(3, "newest complete checkpoints kept; older ones go once a newer one is complete")

    def check(self) -> None:
        _require(self.every_steps is None or self.every_steps >= 1, "checkpoint.every_steps", self.every_steps,
                 "an integer >= 1 or null")
        _require(self.every_epochs is None or self.every_epochs >= 1, "checkpoint.every_epochs", self.every_epochs,
                 "an integer >= 1 or null")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")


@dataclass(frozen=True)
class ExportConfig:
    at_end: bool = documented(True, "export the generator (model.pt, TorchScript, MONAI bundle) when training ends")
    onnx: bool = documented(False, "also write mednist_gan.onnx (needs the onnx package)")

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: Optional[int] = documented(None, "score the generator (docs/quality.md) every N epochs; null = never")
    every_steps: Optional[int] = documented(None, "score the generator every N iterations; null = never")
    num_samples: int = documented(1000, "generated and real (training) images per evaluation")
    keep_best: bool = documented(True, "export the generator with the lowest eval.best_metric so far to <run_dir>/best")
    best_metric: Literal["fd_ssl", "fmd", "kid", "kid_ssl", "swd"] = documented(
        "fd_ssl", "the score (lower is better) that picks the generator kept in <run_dir>/best")
    classifier: Optional[str] = documented(None, "classifier weights (FMD, KID); null = the shipped classifier")
    encoder: Optional[str] = documented(
        None, "self-supervised encoder weights (FD-SSL, precision/recall, density/coverage); null = the shipped one")

    def check(self) -> None:
        _require(self.every_epochs is None or self.every_epochs >= 1, "eval.every_epochs", self.every_epochs,
                 "an integer >= 1 or null")
        _require(self.every_steps is None or self.every_steps >= 1, "eval.every_steps", self.every_steps,
                 "an integer >= 1 or null")
        _require(self.num_samples >= 2, "eval.num_samples", self.num_samples, "an integer >= 2")


@dataclass(frozen=True)
class LogConfig:
    tracker: TrackerName = documented(
        "none", "experiment tracker (any of Accelerate's; docs/tracking.md), on the main process only")
    project: str = documented("mednist-gan", "W&B project / TensorBoard group / MLflow experiment; WANDB_PROJECT wins")
    entity: Optional[str] = documented(None, "W&B entity (team or user); WANDB_ENTITY overrides")
    run_name: Optional[str] = documented(None, "tracker run name; null = the config's name")
    group: Optional[str] = documented(None, "W&B group, e.g. to gather the runs of a sweep")
    tags: list[str] = documented([], "W&B tags")
    mode: Literal["online", "offline", "disabled"] = documented("offline", "W&B mode; WANDB_MODE overrides")
    dir: Optional[str] = documented(None, "where the tracker writes; null = <run_dir>/tracker; WANDB_DIR wins for W&B")
    online_timeout: int = documented(30, "seconds W&B may take to start online before falling back to offline")
    every_steps: int = documented(10, "iterations between progress lines (console, train.log, metrics, tracker)")
    sample_every: Optional[int] = documented(
        50, "log a grid of samples from fixed latents every N iterations and at the end; null = only at the end")
    num_samples: int = documented(64, "images in each sample grid")
    artifact: bool = documented(True, "upload the exported generator files as a W&B artifact at the end")

    def check(self) -> None:
        _require(self.online_timeout >= 1, "log.online_timeout", self.online_timeout, "an integer >= 1")
        _require(self.every_steps >= 1, "log.every_steps", self.every_steps, "an integer >= 1")
        _require(self.sample_every is None or self.sample_every >= 1, "log.sample_every", self.sample_every,
                 "an integer >= 1 or null")
        _require(1 <= self.num_samples <= 1024, "log.num_samples", self.num_samples, "an integer in [1, 1024]")


@dataclass(frozen=True)
class Config:
    name: str = documented("run", "run name; defaults to the config file's name")
    run_dir: Optional[str] = documented(None, "where the run writes everything; null = runs/<name>")
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
        check_per_class("train.mode_seeking_classes", self.train.mode_seeking_classes, names, True, "a number >= 0")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every key as ``section.key`` with its value, tuples as lists (as a record reads them back)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, _, value in walk_keys(self)}

    def to_yaml(self, only_read: bool = False) -> str:
        """Block YAML, short lists on one line, as the config files are written; ``only_read`` leaves out the keys
        of the architecture not chosen."""
        from .load import dump_yaml  # the loader's module, which reads this one

        data = self.to_dict()
        if only_read:
            data["model"] = {k: v for k, v in data["model"].items() if k not in self.model.unread_keys()}
        return dump_yaml(data)


# ----------------------------------------------------------------------------- class folder names

def plain_folder_name(name: object) -> bool:
    """Whether ``name`` can only name one folder inside another (a class folder's name): FOLDER_NAME_RULE."""
    return isinstance(name, str) and name != "" and not name.startswith(".") and not any(c in name for c in "/\\\0")


def check_class_name(name: object, what: str, error: type[MednistGanError] = ConfigError) -> None:
    """Raise ``error`` (``<what>: class name '...' is not allowed: expected a plain folder name ...``) unless
    ``name`` is a plain folder name."""
    if not plain_folder_name(name):
        raise error(f"{what}: class name {short_repr(name)} is not allowed: expected a plain folder name "
                    f"({FOLDER_NAME_RULE})")


# ----------------------------------------------------------------------------- configs read back from records

def config_from_record(data: dict, source: Any) -> Config:
    """The whole config recorded in ``source`` (a checkpoint.json, an export.json), as recorded: not checked
    again. Keys of earlier versions go to their new place; keys this version does not know (a newer one wrote
    them) are ignored with a ConfigWarning."""
    if isinstance(data, dict):
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
        with warnings.catch_warnings():  # nobody can rename a key in a record
            warnings.simplefilter("ignore", ConfigWarning)
            move_legacy_keys(data)
    return _from_record(Config, data, "", source)


def _from_record(cls: type, data: Any, prefix: str, source: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the recorded {prefix.rstrip('.') or 'config'} is not a mapping of keys")
    unknown: list[str] = []
    try:
        cfg = build_section(cls, data, prefix, unknown)
    except ConfigError as exc:
        raise ConfigError(f"{source}: recorded {exc}") from None
    if unknown:  # stacklevel 1: the same record read twice in a process warns once
        warnings.warn(f"{source}: ignoring config keys this version does not know (a newer version wrote them): "
                      f"{clip_text(', '.join(unknown), 200)}", ConfigWarning)
    return cfg
