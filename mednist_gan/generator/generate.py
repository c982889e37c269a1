"""Latents -> images -> PNG files and grids, from any exported generator or a training checkpoint."""

from __future__ import annotations

import math
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy
import torch

from ..errors import MednistGanError, first_line, output_error
from ..files import ensure_writable_folder
from ..images import image_grid, save_png, to_uint8_pictures
from ..terminal import progress_bar
from .loader import open_generator

LATENTS = ("normal", "uniform")
# The generators used when no --model is given (each folder's MODEL_CARD.md says how it was trained): the Hand
# generator of configs/resnet.yaml, and with --class (other than Hand) the six-class one of configs/conditional.yaml;
# assets/generator holds the bundle-architecture one of configs/quality.yaml.
SHIPPED_MODEL = Path(__file__).parents[1] / "assets" / "hand" / "mednist_gan.ts"
SHIPPED_CONDITIONAL = Path(__file__).parents[1] / "assets" / "conditional" / "mednist_gan.ts"
MAX_SAMPLES = 10_000_000  # all latents are drawn at once: 10M of size 128 take 5 GB
MAX_SEED = 2**63 - 1


# Classes that a shipped one-class generator makes better than the six-class one does (FD-SSL at N = 5000 on Hand:
# 0.148 against 0.212, the cards' numbers; test_quality.py checks the order): `--class Hand` without `--model` uses it.
SHIPPED_ONE_CLASS = {"Hand": SHIPPED_MODEL}


def shipped_model(class_name: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """The shipped generator for ``generate`` without ``--model``, and the class to ask it for: the Hand one
    without ``--class`` and for ``--class Hand``, the six-class one for any other class and for ``all``."""
    if class_name is None or class_name in SHIPPED_ONE_CLASS:
        return SHIPPED_ONE_CLASS.get(class_name, SHIPPED_MODEL), None
    return SHIPPED_CONDITIONAL, class_name


def run_generator(net: Callable[..., torch.Tensor], latents: torch.Tensor, model: Path,
                  image_size: Optional[tuple[int, int]] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``net(latents)`` (``net(latents, labels)`` for a class-conditional generator), held to the documented
    interface: images (N, 1, H, W) (H, W = ``image_size`` if given)."""
    try:
        images = net(latents) if labels is None else net(latents, labels)
    except Exception as exc:  # a foreign generator that does not take (N, L) latents
        given = f"latents of shape {tuple(latents.shape)}" + ("" if labels is None else " and class labels")
        raise MednistGanError(f"--model {model}: failed on {given} "
                              f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
    if (not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[:2]) != (len(latents), 1)
            or (image_size is not None and tuple(images.shape[2:]) != tuple(image_size))):
        size = ", ".join(map(str, image_size)) if image_size is not None else "H, W"
        raise MednistGanError(f"--model {model}: returned {shape} for {len(latents)} latents; "
                              f"expected images ({len(latents)}, 1, {size})")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise MednistGanError(f"--model {model}: the generator returned non-finite values (NaN/Inf) for {bad} of "
                              f"{images.numel()} pixels of {len(latents)} images; expected images in [0, 1] "
                              "(are its weights NaN?)")
    return images


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise MednistGanError(f"--seed {seed}: expected an integer from 0 to 2**63 - 1")


def check_device(device: Optional[str]) -> str:
    """``--device``: cpu, cuda or cuda:N (a GPU that is visible); None: cuda when there is one, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise MednistGanError(f"--device {device}: expected cpu, cuda or cuda:N")
    if device != "cpu":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not visible:
            raise MednistGanError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        if match.group(1) is not None and int(match.group(1)) >= visible:
            raise MednistGanError(f"--device {device}: {visible} CUDA GPU(s) visible (cuda:0 to cuda:{visible - 1})")
    return device


def make_latents(n: int, size: int, seed: int, distribution: str = "normal") -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn(n, size, generator=rng)
    if distribution == "uniform":
        return torch.rand(n, size, generator=rng)
    raise MednistGanError(f"--latent {distribution!r}: expected one of {', '.join(LATENTS)}")


def _save_pngs(pictures: numpy.ndarray, paths: list[Path]) -> None:
    for picture, path in zip(pictures, paths):
        save_png(picture, path)


def chosen_classes(model: Path, classes: Optional[list[str]], asked: Optional[str]) -> list[Optional[str]]:
    """The classes to generate: [None] for an unconditional generator; the one named by ``--class``, or every
    class for ``--class all``, for a conditional one (which needs ``--class``)."""
    if classes is None:
        if asked is not None:
            raise MednistGanError(f"--class {asked}: --model {model} is an unconditional generator (one class); "
                                  "leave --class out")
        return [None]
    if asked is None:
        raise MednistGanError(f"--model {model}: a class-conditional generator of {', '.join(classes)}; "
                              "name the class with --class NAME, or --class all")
    if asked == "all":
        return list(classes)
    if asked not in classes:
        raise MednistGanError(f"--class {asked}: --model {model} makes {', '.join(classes)} (or --class all)")
    return [asked]


def generate(model: Path, num_samples: int, output_dir: Path, seed: int = 0, batch_size: int = 256,
             grid: Optional[Path] = None, latent: str = "normal", device: Optional[str] = None,
             latent_size: Optional[int] = None, class_name: Optional[str] = None) -> list[Path]:
    """Write ``num_samples`` PNGs (``sample_00000.png``, ...) and optionally a grid; returns the PNG paths.

    A class-conditional generator makes the class ``class_name`` names, or with ``"all"`` ``num_samples`` of each
    class into ``<output_dir>/<class>/`` from the same latents, and a grid with one row per class (its first 8
    images), the class's name left of the row.
    """
    if num_samples < 1:
        raise MednistGanError(f"--num-samples {num_samples}: expected an integer >= 1")
    if num_samples > MAX_SAMPLES:
        raise MednistGanError(f"--num-samples {num_samples}: expected at most {MAX_SAMPLES:,} (for more, run again "
                              "with another --seed and --output-dir)")
    if batch_size < 1:
        raise MednistGanError(f"--batch-size {batch_size}: expected an integer >= 1")
    check_seed(seed)
    device = check_device(device)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise MednistGanError(f"--output-dir {output_dir}: exists and is not a folder")
    opened = open_generator(model, latent_size)
    chosen = chosen_classes(model, opened.classes, class_name)
    net = opened.network.to(device)
    latents = make_latents(num_samples, opened.latent_size, seed, latent)
    per_class = len(chosen) > 1
    folders = [output_dir / name if per_class else output_dir for name in chosen]
    for folder in folders:
        ensure_writable_folder(folder, "--output-dir")
    if grid is not None:
        ensure_writable_folder(Path(grid).parent, "--grid")
    width = max(5, len(str(num_samples - 1)))
    columns = min(8, num_samples) if per_class else None
    shown = columns or 64  # the grid: the first 64 images, or the first 8 of every class
    paths, pictures, writes = [], [], deque()
    writers = max(2, os.cpu_count() or 2)
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=writers) as pool, \
            progress_bar(num_samples * len(chosen), "generate") as bar:  # zlib releases the GIL
        try:
            for name, folder in zip(chosen, folders):
                class_paths = [folder / f"sample_{i:0{width}d}.png" for i in range(num_samples)]
                paths += class_paths
                for start in range(0, num_samples, batch_size):
                    batch_latents = latents[start:start + batch_size].to(device)
                    labels = (None if name is None else torch.full((len(batch_latents),), opened.label(name),
                                                                  dtype=torch.long, device=device))
                    batch = to_uint8_pictures(run_generator(net, batch_latents, model, labels=labels))
                    bar.update(len(batch))
                    chunk = max(1, math.ceil(len(batch) / writers))  # one task per writer and batch, not one per image
                    writes += [pool.submit(_save_pngs, batch[i:i + chunk], class_paths[start + i:start + i + chunk])
                               for i in range(0, len(batch), chunk)]
                    while writes and writes[0].done():
                        writes.popleft().result()  # a failed write (a full disk) stops generating at once
                    if start < shown:
                        pictures.append(batch[: shown - start])
            while writes:
                writes.popleft().result()
        except OSError as exc:
            pool.shutdown(cancel_futures=True)
            raise output_error("--output-dir", output_dir, exc) from None
    if grid is not None:
        try:
            save_png(image_grid(numpy.concatenate(pictures), columns, labels=chosen if per_class else None),
                     Path(grid))
        except OSError as exc:
            raise output_error("--grid", grid, exc) from None
    return paths
