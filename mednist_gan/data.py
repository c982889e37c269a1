"""MedNIST images: find or download them, decode once into a cached uint8 tensor, and augment batches on the device.

Images keep MONAI's tensor orientation (``LoadImage`` with the PIL reader returns the transpose of the
JPEG's rows/columns), so weights stay interchangeable with the seed bundle.

Every image becomes 8-bit grey before MONAI sees it: 16-bit grey as v16 / 257 rounded (a picture saved as
8-bit and as 16-bit with v * 257 decodes to the same pixels), 1-bit as 0/255, a palette image through its
palette when all its colours are grey. Colour (RGB, a palette with colours) and transparency (LA, RGBA, PA)
are refused, naming the file and the mode.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .errors import DataError, first_line
from .files import write_atomic
from .prepare import SOURCE_SUFFIXES, Fit, wrong_size

log = logging.getLogger(__name__)

SAMPLE_ROOT = Path(__file__).parent / "sample_data"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_CACHE_VERSION = "v2"  # part of the cache key: change it whenever decoding changes

# The bundle's augmentation: RandRotated(range_x=pi/12, p=0.5), RandFlipd(spatial_axis=0, p=0.5),
# RandZoomd(min_zoom=0.9, max_zoom=1.1, p=0.5), applied in that order.
ROTATE_PROB, ROTATE_RANGE = 0.5, math.pi / 12
FLIP_PROB = 0.5
ZOOM_PROB, ZOOM_MIN, ZOOM_MAX = 0.5, 0.9, 1.1


# ----------------------------------------------------------------------------- finding the files

def resolve_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.root)) if cfg.root is not None else SAMPLE_ROOT


def _class_folder(root: Path, class_name: str) -> Optional[Path]:
    for folder in (root / class_name, root / "MedNIST" / class_name):
        if folder.is_dir():
            return folder
    return None


def _no_class_folder(root: Path, class_name: str) -> DataError:
    return DataError(f"data.root={str(root)!r}: no {class_name}/ folder with images there "
                     "(point data.root at the MedNIST folder, or set data.download=true)")


def image_folder(cfg: DataConfig, class_name: Optional[str] = None) -> Path:
    """The folder holding a class's images (the first of ``data.classes`` by default), downloading MedNIST first
    when asked to."""
    class_name = class_name or cfg.class_names[0]
    root = resolve_root(cfg)
    folder = _class_folder(root, class_name)
    if folder is None and cfg.download:
        download_mednist(root, cfg.url, cfg.md5)
        folder = _class_folder(root, class_name)
        if folder is None:
            raise DataError(f"data.url={cfg.url}: the downloaded archive has no {class_name}/ folder")
    if folder is None:
        raise _no_class_folder(root, class_name)
    return folder


def describe_data(cfg: DataConfig, image_shape: list[int]) -> str:
    """The dry run's look at the data, in one line: every class folder is there with images, and the first image
    of each decodes at the model's size (a problem is the one-line error training would stop with)."""
    root, counts, fit = resolve_root(cfg), [], image_fit(cfg)
    for name in cfg.class_names:
        folder = _class_folder(root, name)
        if folder is None and cfg.download:
            return f"data: {root}: no {name}/ folder yet; data.download=true fetches MedNIST before training"
        if folder is None:
            raise _no_class_folder(root, name)
        files = list_images(folder, fit)
        _decode(files[0], tuple(image_shape[-2:]), fit)
        counts.append(f"{name} {len(files):,}")
    limit = f", data.limit={cfg.limit} of each" if cfg.limit else ""
    return f"data: {root}: {', '.join(counts)} images{limit}, {image_shape[-2]}x{image_shape[-1]} grey"


def download_mednist(root: Path, url: str, md5: str) -> None:
    """Download MedNIST.tar.gz with MONAI's utility, verify its MD5 and extract it into ``root``."""
    from monai.apps import download_and_extract

    root.mkdir(parents=True, exist_ok=True)
    archive = root / "MedNIST.tar.gz"
    try:
        download_and_extract(url, filepath=archive, output_dir=root, hash_val=md5, hash_type="md5", progress=False)
    except Exception as exc:  # MONAI raises RuntimeError/URLError/ValueError with long messages
        reason = first_line(exc) or type(exc).__name__
        raise DataError(f"data.url={url}: download or verification failed: {reason}") from exc


def square_size(path: Path) -> tuple[int, int]:
    """The (side, side) of a square image file, read from its header; one line for another shape."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__})") from None
    if width != height:
        raise DataError(f"{path}: {width}x{height}; expected square images")
    return width, height


def image_fit(cfg: DataConfig) -> Optional[Fit]:
    """How ``data.resize`` / ``data.intensity`` bring images to the model (None: neither is set, MedNIST's path)."""
    if cfg.resize is None and cfg.intensity is None:
        return None
    window = None if cfg.intensity is None else (cfg.intensity["min"], cfg.intensity["max"])
    return Fit(cfg.resize, cfg.interpolation, window)


def list_images(folder: Path, fit: Optional[Fit] = None) -> list[Path]:
    """The images of a folder, sorted by name: JPEG and PNG, and with a ``fit`` also TIFF, DICOM and BMP."""
    suffixes = IMAGE_SUFFIXES if fit is None else SOURCE_SUFFIXES
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join('*' + s for s in suffixes)}) in this folder")
    return files


# ----------------------------------------------------------------------------- decoding and caching

class _NotGrey(Exception):
    """An image mode that is not a single grey channel (the message says which)."""


def _to_grey(image):
    """A PIL image as 8-bit grey (mode L), or ``_NotGrey``."""
    from PIL import Image

    if image.mode in ("L", "1"):
        return image.convert("L")
    if image.mode.startswith("I"):  # 16-bit grey PNG: I;16, I;16B, or I in older Pillow
        return Image.fromarray(np.clip(np.rint(np.asarray(image) / 257), 0, 255).astype(np.uint8))
    if image.mode == "P":
        rgb = np.asarray(image.convert("RGB"))
        if (rgb == rgb[..., :1]).all():
            return image.convert("L")
        raise _NotGrey("mode P with colours in its palette")
    raise _NotGrey(f"mode {image.mode}")


@functools.lru_cache(maxsize=1)
def _image_loader():
    """MONAI's LoadImage with the PIL reader (made grey by ``_to_grey``), built once: building one sets up every
    reader MONAI has (with pydicom installed, its GPU DICOM plugin, which warns that it is missing a GPU)."""
    import warnings

    from monai.data import PILReader
    from monai.transforms import LoadImage

    reader = PILReader(converter=_to_grey)
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level, plugin_log.level = plugin_log.level, logging.ERROR
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            return LoadImage(reader=reader, image_only=True), reader
    finally:
        plugin_log.setLevel(level)


def _decode(path: Path, expected_hw: tuple[int, int], fit: Optional[Fit] = None) -> np.ndarray:
    """One image as MONAI reads it: LoadImage (PIL reader, made grey by ``_to_grey``) then channel first;
    uint8 (1, H, W). With a ``fit``: as prepare-data writes it and MONAI then reads it (transposed)."""
    from monai.transforms import EnsureChannelFirst

    if fit is not None:
        return np.ascontiguousarray(fit.decode(path, expected_hw[0]).T[None])

    load, reader = _image_loader()
    try:  # passed at call time, the reader's own errors (_NotGrey) reach us unwrapped
        image = load(str(path), reader=reader)
    except _NotGrey as exc:
        raise DataError(f"{path}: expected a single-channel (grayscale) image, got {exc}") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__})") from None
    if tuple(image.shape) != expected_hw:
        raise wrong_size(path, expected_hw, image.shape)
    array = EnsureChannelFirst(channel_dim="no_channel")(image).numpy()
    return array.astype(np.uint8)


def _cache_key(files: list[Path], expected_hw: tuple[int, int], bad_files: str, fit: Optional[Fit]) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}:{expected_hw}:{bad_files}{'' if fit is None else f':{fit}'}".encode())
    for p in files:
        st = p.stat()
        h.update(os.fsencode(p.resolve()) + f":{st.st_size}:{st.st_mtime_ns}\n".encode())  # any name the OS allows
    return h.hexdigest()[:24]


CACHE_PATTERN = "images-*.pt"  # one decoded image set each; nothing else in the cache folder is ours


def cache_entries(cache_dir: str) -> list[Path]:
    """The decoded image sets in ``cache_dir`` (none when it does not exist)."""
    folder = Path(os.path.expanduser(cache_dir))
    return sorted(folder.glob(CACHE_PATTERN)) if folder.is_dir() else []


def load_images(files: list[Path], expected_hw: tuple[int, int] = (64, 64), cache_dir: Optional[str] = None,
                bad_files: str = "error", fit: Optional[Fit] = None) -> torch.Tensor:
    """Decode every file once into a uint8 tensor (N, 1, H, W), reusing a disk cache when it is valid."""
    cache_file = None
    if cache_dir is not None:
        key = _cache_key(files, expected_hw, bad_files, fit)
        cache_file = Path(os.path.expanduser(cache_dir)) / CACHE_PATTERN.replace("*", key)
        if cache_file.is_file():
            try:
                return torch.load(cache_file, weights_only=True)
            except Exception:
                log.warning("ignoring unreadable image cache %s", cache_file)
    arrays, skipped = [], []
    for path in files:
        try:
            arrays.append(_decode(path, expected_hw, fit))
        except DataError as exc:
            if bad_files != "skip":
                raise
            skipped.append(str(exc))
    if skipped:
        log.warning("skipped %d unusable image(s) (data.bad_files=skip), first: %s", len(skipped), skipped[0])
    if not arrays:
        raise DataError(f"{files[0].parent}: none of the {len(files)} files could be used as an image")
    images = torch.from_numpy(np.stack(arrays))
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_file, lambda tmp: torch.save(images, tmp))
        except OSError as exc:  # a read-only home must not stop training
            log.warning("could not write image cache %s: %s", cache_file, exc)
    return images


def load_dataset(cfg: DataConfig, image_shape: list[int]) -> torch.Tensor:
    """The configured classes' images as a uint8 tensor (N, 1, H, W) in MONAI orientation."""
    return load_labelled_dataset(cfg, image_shape)[0]


def load_labelled_dataset(cfg: DataConfig, image_shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 of every class of ``data.classes`` (``data.limit`` per class) and their labels
    (N,) int64: the class's index in that list."""
    images, labels, fit = [], [], image_fit(cfg)
    for label, name in enumerate(cfg.class_names):
        files = list_images(image_folder(cfg, name), fit)
        if cfg.limit is not None:
            files = files[: cfg.limit]
        images.append(load_images(files, tuple(image_shape[1:]), cfg.cache_dir, cfg.bad_files, fit))
        labels.append(torch.full((len(images[-1]),), label, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def scale_intensity(images: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1], as MONAI's ``ScaleIntensity()`` computes it (float32)."""
    x = images.float()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    scaled = (x - lo) / torch.where(span == 0, torch.ones_like(span), span)
    return torch.where(span == 0, torch.zeros_like(x), scaled)


# ----------------------------------------------------------------------------- DataLoader

class IndexDataset(Dataset):
    """The positions 0..N-1 of the images: batches of indices, gathered from the images on the device.

    The decoded images (uint8; all of MedNIST is about 240 MB) live on the training device, so a batch
    costs one small index copy and one gather there; scaling and augmentation follow, batched, on the device.
    """

    def __init__(self, num_items: int):
        self.num_items = num_items

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> int:
        return index


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch): the same on every process and after a resume.

    With ``labels`` of several classes, an epoch is as many draws (with replacement) in which every class is
    equally likely, whatever its number of images: classes sampled evenly; or, with ``class_weights`` (one per
    label), each class in proportion to its weight.

    ``skip_in_epoch`` drops the first items of one epoch's order, so a run resumed mid-epoch
    continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_items: int, seed: int, labels: Optional[torch.Tensor] = None,
                 class_weights: Optional[list[float]] = None):
        self.num_items, self.seed, self.epoch = num_items, seed, 0
        self._skip_epoch, self._skip = -1, 0
        self.weights = None
        if labels is not None and int(labels.max()) > 0:
            counts = torch.bincount(labels).double()
            shares = (torch.ones_like(counts) if class_weights is None
                      else torch.tensor(class_weights, dtype=torch.double))
            self.weights = (shares / counts)[labels]

    def set_epoch(self, epoch: int) -> None:  # Accelerate's DataLoaderShard calls this at every epoch start
        self.epoch = epoch

    def skip_in_epoch(self, epoch: int, num_items: int) -> None:
        self._skip_epoch, self._skip = epoch, num_items

    def _skipped(self) -> int:
        return self._skip if self.epoch == self._skip_epoch else 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=g)
        return iter(order[self._skipped():].tolist())

    def __len__(self) -> int:
        return max(self.num_items - self._skipped(), 0)


def build_dataloader(num_items: int, global_batch_size: int, seed: int, pin_memory: bool = False,
                     labels: Optional[torch.Tensor] = None, class_weights: Optional[list[float]] = None) -> DataLoader:
    """Index batches of the *global* size; Accelerate (split_batches=True) hands each process its slice.
    ``labels`` of several classes: classes sampled evenly, or by ``class_weights`` (``EpochShuffleSampler``)."""
    return DataLoader(
        IndexDataset(num_items),
        batch_size=global_batch_size,
        sampler=EpochShuffleSampler(num_items, seed, labels, class_weights),
        drop_last=False,
        num_workers=0,
        # Pinned index batches reach a GPU with an asynchronous copy: the host never waits for the device.
        pin_memory=pin_memory,
        # A private generator keeps DataLoader start-up from drawing on the global RNG, which would
        # make a resumed run's augmentation and dropout differ from an uninterrupted run's.
        generator=torch.Generator().manual_seed(seed),
    )


# ----------------------------------------------------------------------------- batched augmentation

@dataclass
class AugmentParams:
    """Per-sample parameters of the bundle's three random transforms (tensors of length N)."""

    rotate: torch.Tensor  # bool: rotation applied
    angle: torch.Tensor  # radians, used where rotate
    flip: torch.Tensor  # bool: flipped along spatial axis 0
    zoom: torch.Tensor  # bool: zoom applied
    factor: torch.Tensor  # zoom factor, used where zoom

    def __getitem__(self, index: slice) -> "AugmentParams":
        """The parameters of samples ``index`` (e.g. one process's slice of the global batch)."""
        return AugmentParams(**{k: v[index] for k, v in vars(self).items()})


def sample_augment_params(n: int, device: torch.device | str,
                          generator: Optional[torch.Generator] = None) -> AugmentParams:
    """Draw from the same distributions as RandRotated / RandFlipd / RandZoomd (``generator``, or the global RNG)."""
    u = torch.rand(5, n, device=device, generator=generator)
    return AugmentParams(
        rotate=u[0] < ROTATE_PROB,
        angle=(u[1] * 2 - 1) * ROTATE_RANGE,
        flip=u[2] < FLIP_PROB,
        zoom=u[3] < ZOOM_PROB,
        factor=ZOOM_MIN + u[4] * (ZOOM_MAX - ZOOM_MIN),
    )


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MONAI ``Flip(spatial_axis=0)`` on the samples where ``mask`` is true (exact)."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-2), x)


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """MONAI ``Rotate(angle, keep_size=True)`` per sample: bilinear, border padding, one ``grid_sample``."""
    if x.shape[0] == 0:  # affine_grid refuses an empty batch
        return x
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    # Output coordinates (normalised, align_corners=False) map to input coordinates; grid x is the last axis.
    theta = torch.stack([torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], -2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def zoom(x: torch.Tensor, factor: torch.Tensor, min_factor: float = ZOOM_MIN,
         max_factor: float = ZOOM_MAX) -> torch.Tensor:
    """MONAI ``Zoom(factor, keep_size=True)`` per sample: area interpolation, centred edge-pad or crop.

    MONAI resizes to ``floor(size * factor)`` pixels, so factors in ``[min_factor, max_factor]`` give only a
    handful of sizes (57-70 for 64 pixels and the bundle's range); each size is one batched ``interpolate``
    of the whole batch, kept for the samples of that size. Knowing the sizes from the range rather than
    from the factors keeps the host from waiting for the device (no ``unique``, no indexing by a mask).
    """
    size = x.shape[-1]
    new_sizes = torch.floor(size * factor.double()).long().view(-1, 1, 1, 1)
    out = x
    for s in range(math.floor(size * min_factor), math.floor(size * max_factor) + 1):
        if s == size:
            continue
        y = F.interpolate(x, size=(s, s), mode="area")
        if s < size:
            before = (size - s) // 2
            y = F.pad(y, (before, size - s - before, before, size - s - before), mode="replicate")
        else:
            start = s // 2 - size // 2
            y = y[..., start:start + size, start:start + size]
        out = torch.where(new_sizes == s, y, out)
    return out


def apply_augment(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Rotate, flip, zoom (each where its mask is set), in the order of the bundle's Compose.

    Each transform runs on the whole batch and is kept where its mask is set: a sample's result does not
    depend on the others, and the host never waits for the device to learn which samples were picked.
    """
    x = torch.where(p.rotate.view(-1, 1, 1, 1), rotate(x, p.angle), x)
    x = flip(x, p.flip)
    return zoom(x, torch.where(p.zoom, p.factor, torch.ones_like(p.factor)))


def augment(x: torch.Tensor) -> torch.Tensor:
    return apply_augment(x, sample_augment_params(x.shape[0], x.device))
