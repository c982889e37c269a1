"""``mednist-gan prepare-data SRC DST``: a folder of a lab's own 2-D images (one folder per class: PNG 8- or 16-bit,
JPEG, TIFF, DICOM) checked, reported and written as the training data set: 8-bit grey PNGs of one square size.

Each image is read at full precision (16-bit PNG and TIFF values, DICOM values with their rescale slope and
intercept, e.g. Hounsfield units), brought to ``size`` x ``size`` (``resize``: ``center-crop`` scales the shorter
side to the size and crops the middle, ``pad`` scales the longer side and pads with the image's minimum,
``stretch`` scales each side; ``interpolation``: ``area``, ``bilinear``, ``bicubic`` or ``nearest``), mapped to
[0, 1] (per image from its minimum to its maximum, as MONAI's ScaleIntensity does, or by a fixed ``window``
(low, high), e.g. (-1000, 1000) for CT) and written as 8-bit PNG. Training then decodes the prepared folder once
into its cache, as it does MedNIST. Files that cannot be read are skipped and listed in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config.schema import Interpolation, ResizeMode
from .errors import DataError, OutputError, first_line
from .files import write_atomic
from .images import encode_png

SOURCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".bmp")
RESIZE_MODES = typing.get_args(ResizeMode)
INTERPOLATIONS = typing.get_args(Interpolation)
REPORT_FILE = "prepare.json"


@dataclass(frozen=True)
class Fit:
    """How a source image becomes a training image (module docstring); ``resize`` None: it must already be the size.
    Training uses it too, when ``data.resize`` or ``data.intensity`` is set."""

    resize: Optional[str] = "center-crop"
    interpolation: str = "area"
    window: Optional[tuple[float, float]] = None

    def apply(self, image: np.ndarray, size: int) -> np.ndarray:
        """A full-precision (H, W) image as (size, size) uint8 levels."""
        return to_levels(fit_size(image, size, self.resize or "stretch", self.interpolation), self.window)

    def decode(self, path: Path, size: int) -> np.ndarray:
        """The file as (size, size) uint8 levels, as prepare-data writes them; ``DataError`` naming the file."""
        try:
            image, _ = read_grey(path)
        except _Unreadable as exc:
            raise DataError(f"{path}: {exc}") from None
        if self.resize is None and image.shape != (size, size):
            raise wrong_size(path, (size, size), image.shape)
        return self.apply(image, size)


def wrong_size(path: Path, expected: tuple[int, int], got: tuple[int, ...]) -> DataError:
    return DataError(f"{path}: expected a {expected[0]}x{expected[1]} image, got {got[0]}x{got[1]} "
                     f"(data.resize: {', '.join(RESIZE_MODES[:-1])} or {RESIZE_MODES[-1]} fits any size)")


class _Unreadable(Exception):
    """A file that is not an image this command can use (the message says why)."""


def read_grey(path: Path) -> tuple[np.ndarray, str]:
    """A 2-D grey image at full precision (float64) and what it was (its mode or format), or ``_Unreadable``."""
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path)
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":
                image = image.convert("RGB")
            if image.mode in ("RGB", "RGBA", "LA"):
                array = np.asarray(image)
                if image.mode == "RGB" and (array == array[..., :1]).all():  # grey stored as colour
                    return array[..., 0].astype(np.float64), mode
                raise _Unreadable(f"mode {mode}: not a single grey channel")
            if image.mode == "1":
                image = image.convert("L")
            return np.asarray(image).astype(np.float64), mode
    except _Unreadable:
        raise
    except Exception as exc:
        raise _Unreadable(f"cannot be read as an image ({type(exc).__name__}: {first_line(exc, 80)})") from None


def _read_dicom(path: Path) -> tuple[np.ndarray, str]:
    try:
        import pydicom
    except ImportError:
        raise DataError(f'{path}: reading DICOM needs pydicom: pip install "mednist-gan[dicom]"') from None
    try:
        dataset = pydicom.dcmread(path)
        array = dataset.pixel_array.astype(np.float64)
    except Exception as exc:
        raise _Unreadable(f"cannot be read as DICOM ({type(exc).__name__}: {first_line(exc, 80)})") from None
    if array.ndim != 2:
        raise _Unreadable(f"DICOM pixel data of shape {array.shape}: expected one 2-D slice")
    slope, intercept = float(getattr(dataset, "RescaleSlope", 1)), float(getattr(dataset, "RescaleIntercept", 0))
    return array * slope + intercept, f"DICOM {getattr(dataset, 'Modality', '?')}"


def fit_size(image: np.ndarray, size: int, resize: str, interpolation: str) -> torch.Tensor:
    """``image`` (H, W) as a (size, size) float64 tensor, by ``resize`` and ``interpolation`` (module docstring)."""
    x = torch.from_numpy(image)[None, None]
    h, w = image.shape
    if resize == "stretch":
        target = (size, size)
    else:
        scale = size / (min(h, w) if resize == "center-crop" else max(h, w))
        target = (max(1, round(h * scale)), max(1, round(w * scale)))
    if target != (h, w):
        smooth = interpolation in ("bilinear", "bicubic")
        x = F.interpolate(x, size=target, mode=interpolation, antialias=smooth and target[0] < h,
                          **({"align_corners": False} if smooth else {}))
    th, tw = x.shape[-2:]
    if resize == "center-crop":
        top, left = (th - size) // 2, (tw - size) // 2
        x = x[..., top:top + size, left:left + size]
    elif resize == "pad":
        low = float(x.min())
        top, left = (size - th) // 2, (size - tw) // 2
        x = F.pad(x, [left, size - tw - left, top, size - th - top], value=low)
    return x[0, 0]


def to_levels(image: torch.Tensor, window: Optional[tuple[float, float]]) -> np.ndarray:
    """[0, 255] levels: from the image's minimum to its maximum, or from ``window``'s low to its high (clipped)."""
    low, high = window if window is not None else (float(image.min()), float(image.max()))
    unit = ((image - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(image)
    return torch.round(unit * 255).to(torch.uint8).numpy()


@dataclass
class ClassReport:
    images: int = 0
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"images": self.images, "sizes": {f"{h}x{w}": n for (h, w), n in self.sizes.most_common()},
                "modes": dict(self.modes.most_common()), "unreadable": self.unreadable}


def prepare_data(src: Path, dst: Path, size: int = 64, resize: str = "center-crop", interpolation: str = "area",
                 window: Optional[tuple[float, float]] = None) -> dict:
    """Check ``src`` (class folders), write the prepared set to ``dst`` (new or empty) and its report; returns it."""
    src, dst = Path(src), Path(dst)
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")) if src.is_dir() else []
    if not classes:
        raise DataError(f"{src}: no class folders (expected one folder of images per class)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputError(f"{dst}: exists and is not an empty folder; choose a new one, nothing was written")
    if size < 8 or resize not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise DataError(f"--size {size} --resize {resize} --interpolation {interpolation}: expected a size >= 8, "
                        f"--resize one of {', '.join(RESIZE_MODES)}, "
                        f"--interpolation one of {', '.join(INTERPOLATIONS)}")
    if window is not None and not window[0] < window[1]:
        raise DataError(f"--window {window[0]} {window[1]}: expected LOW < HIGH")
    staging = dst.parent / f".{dst.name}.preparing-{os.getpid()}"
    fit, reports = Fit(resize, interpolation, window), {}
    try:
        for folder in classes:
            reports[folder.name] = _prepare_class(folder, staging / folder.name, size, fit)
        empty = [name for name, r in reports.items() if r.images == 0]
        if empty:
            raise DataError(f"{src}: no usable image in {', '.join(empty)}; nothing was written")
        report = {"source": str(src.resolve()), "size": size, "resize": resize, "interpolation": interpolation,
                  "intensity": {"window": list(window)} if window else "per image, minimum to maximum",
                  "classes": {name: r.as_dict() for name, r in reports.items()}}
        write_atomic(staging / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        if dst.exists():
            dst.rmdir()  # empty, checked above
        os.rename(staging, dst)
    except OSError as exc:
        raise OutputError(f"{dst}: cannot be written ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _prepare_class(folder: Path, out: Path, size: int, fit: Fit) -> ClassReport:
    report = ClassReport()
    out.mkdir(parents=True)
    sources = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES)
    stems = Counter(p.stem for p in sources)
    for path in sources:
        try:
            image, mode = read_grey(path)
        except _Unreadable as exc:
            report.unreadable.append(f"{path.name}: {exc}")
            continue
        report.images += 1
        report.sizes[image.shape] += 1
        report.modes[mode] += 1
        name = path.stem if stems[path.stem] == 1 else path.name  # slice.dcm and slice.tif: two files
        (out / f"{name}.png").write_bytes(encode_png(fit.apply(image, size)))
    return report


def format_report(report: dict, dst: Path) -> str:
    """The report in a few lines: each class's image count, sizes, modes and unreadable files."""
    lines = [f"prepared {dst}: {report['size']}x{report['size']} 8-bit PNGs ({report['resize']}, "
             f"{report['interpolation']}; intensity {report['intensity']})"]
    for name, r in report["classes"].items():
        sizes = ", ".join(f"{k} ({v})" for k, v in r["sizes"].items())
        modes = ", ".join(f"{k} ({v})" for k, v in r["modes"].items())
        lines.append(f"  {name}: {r['images']} images; sizes {sizes}; modes {modes}"
                     + (f"; {len(r['unreadable'])} unreadable, skipped: {r['unreadable'][0]}"
                        + (" ..." if len(r["unreadable"]) > 1 else "") if r["unreadable"] else ""))
    return "\n".join(lines)
