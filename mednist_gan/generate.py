"""Latents -> images -> PNG files and grids, from any exported generator or a training checkpoint."""

from __future__ import annotations

import json
import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .errors import CheckpointError, MednistGanError, output_error
from .images import image_grid, save_png, to_uint8_pictures

LATENTS = ("normal", "uniform")
# The generator trained with configs/quality.yaml (see its MODEL_CARD.md), used when no --model is given.
SHIPPED_MODEL = Path(__file__).parent / "assets" / "generator" / "mednist_gan.ts"


def load_model(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Any generator the toolkit knows: ``mednist_gan.ts``, a ``model.pt`` state_dict, or a checkpoint folder.

    Returns a function from latents to images in [0, 1] (MONAI orientation) and the latent size.
    """
    # The export module brings MONAI (seconds to import): only the formats that need its Generator load it.
    path = Path(path)
    if path.is_dir():
        from .export import load_checkpoint_generator

        generator, _ = load_checkpoint_generator(path)
        return generator, int(generator.latent_shape[0])
    if not path.is_file():
        raise CheckpointError(f"--model {path}: no such file or folder")
    _verify_against_export_record(path)
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise CheckpointError(f"--model {path}: not a loadable TorchScript file ({type(exc).__name__})") from None
        latent = _torchscript_latent_size(module)
        return module, latent
    from .export import load_generator_weights

    generator = load_generator_weights(path)
    return generator, int(generator.latent_shape[0])


def _verify_against_export_record(path: Path) -> None:
    """An exported file is checked against the sha256 its ``export.json`` records (when it sits beside one)."""
    from .checkpoint import verify_recorded_sha256

    record = path.parent / "export.json"
    if not record.exists():
        return
    try:
        expected = json.loads(record.read_text())["files"].get(path.name, {}).get("sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{record}: unreadable export record ({type(exc).__name__}: {exc})"[:300]) from None
    verify_recorded_sha256(path, expected, record)


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())


def _torchscript_latent_size(module: torch.jit.ScriptModule) -> int:
    for name, param in module.named_parameters():
        if name.endswith("linear.weight"):
            return int(param.shape[1])
    raise CheckpointError("TorchScript model has no generator input layer (linear.weight): not a mednist-gan export")


def make_latents(n: int, size: int, seed: int, distribution: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if distribution == "normal":
        return torch.randn(n, size, generator=g)
    if distribution == "uniform":
        return torch.rand(n, size, generator=g)
    raise MednistGanError(f"--latent {distribution!r}: expected one of {', '.join(LATENTS)}")


def _save_pngs(pictures: np.ndarray, paths: list[Path]) -> None:
    for picture, path in zip(pictures, paths):
        save_png(picture, path)


def generate(model: Path, num_samples: int, output_dir: Path, seed: int = 0, batch_size: int = 256,
             grid: Optional[Path] = None, latent: str = "normal", device: Optional[str] = None) -> list[Path]:
    """Write ``num_samples`` PNGs (``sample_00000.png``, ...) and optionally a grid; returns the PNG paths."""
    if num_samples < 1:
        raise MednistGanError(f"--num-samples {num_samples}: expected an integer >= 1")
    if batch_size < 1:
        raise MednistGanError(f"--batch-size {batch_size}: expected an integer >= 1")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise MednistGanError(f"--output-dir {output_dir}: exists and is not a folder")
    net, latent_size = load_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device)
    latents = make_latents(num_samples, latent_size, seed, latent)
    for folder, what in ((output_dir, "--output-dir"), (Path(grid).parent if grid is not None else None, "--grid")):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(what, grid if what == "--grid" else folder, exc) from None
    width = max(5, len(str(num_samples - 1)))
    paths = [output_dir / f"sample_{i:0{width}d}.png" for i in range(num_samples)]
    pictures, writes = [], []
    writers = max(2, os.cpu_count() or 2)
    with torch.inference_mode(), ThreadPoolExecutor(max_workers=writers) as pool:  # zlib releases the GIL
        for start in range(0, num_samples, batch_size):
            batch = to_uint8_pictures(net(latents[start:start + batch_size].to(device)))
            chunk = max(1, math.ceil(len(batch) / writers))  # one task per writer and batch, not one per image
            writes += [pool.submit(_save_pngs, batch[i:i + chunk], paths[start + i:start + i + chunk])
                       for i in range(0, len(batch), chunk)]
            if start < 64:
                pictures.append(batch[: 64 - start])
        try:
            for write in writes:
                write.result()  # re-raise the first failed write
        except OSError as exc:
            raise output_error("--output-dir", output_dir, exc) from None
    if grid is not None:
        try:
            save_png(image_grid(np.concatenate(pictures)), Path(grid))
        except OSError as exc:
            raise output_error("--grid", grid, exc) from None
    return paths
