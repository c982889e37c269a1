"""Image utilities shared by generation, tracking, training and evaluation: uint8 conversion, grids, PNG files.

Generated images are (N, 1, H, W) tensors in [0, 1] in MONAI's orientation (the transpose of the
JPEG's rows/columns); pictures are (N, H, W) uint8 arrays standing upright, as files show them.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> uint8 levels as ``SaveImaged(scale=255, output_dtype=uint8)`` writes them (truncated)."""
    return (images.float().clamp(0, 1) * 255).to(torch.uint8)


def to_uint8_pictures(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [0, 1], MONAI orientation -> (N, W, H) uint8 pictures standing upright.

    Same conversion as the bundle's ``SaveImaged(scale=255, output_dtype=uint8)``: transpose back to the
    JPEG's row order, multiply by 255, truncate.
    """
    return to_uint8(images)[:, 0].transpose(1, 2).contiguous().cpu().numpy()


def image_grid(pictures: np.ndarray, columns: Optional[int] = None, pad: int = 2,
               labels: Optional[Sequence[str]] = None) -> np.ndarray:
    """(N, H, W) uint8 pictures in rows of ``columns`` (default: as many as make a square), ``pad`` black pixels
    between and around them.

    ``labels``: a name per row (e.g. its class), drawn in white with PIL's default bitmap font in a black margin
    left of the grid; the grid itself is the same, shifted right by the margin's width (``label_margin``).
    """
    n, h, w = pictures.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    for i, picture in enumerate(pictures):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = picture
    if labels is None:
        return grid
    if len(labels) != rows:
        raise ValueError(f"image_grid: {len(labels)} labels for {rows} rows")
    return np.concatenate([_margin_with_labels(labels, grid.shape[0], h, pad), grid], axis=1)


LABEL_GAP = 4  # black pixels either side of a row's label


def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()  # the bitmap font: the same pixels with or without FreeType


def _printable(label: str) -> str:
    return str(label).encode("latin-1", errors="replace").decode("latin-1")  # what the bitmap font can draw


def label_margin(labels: Sequence[str]) -> int:
    """The width in pixels of the margin ``image_grid`` puts left of a grid for these row labels."""
    font = _label_font()
    return 2 * LABEL_GAP + max(int(font.getbbox(_printable(label))[2]) for label in labels)


def _margin_with_labels(labels: Sequence[str], height: int, row_height: int, pad: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    font = _label_font()
    margin = Image.new("L", (label_margin(labels), height), 0)
    draw = ImageDraw.Draw(margin)
    for r, label in enumerate(labels):
        text = _printable(label)
        top, bottom = font.getbbox(text)[1::2]
        y = pad + r * (row_height + pad) + (row_height - (bottom - top)) // 2 - top  # centred on the row
        draw.text((LABEL_GAP, y), text, fill=255, font=font)
    return np.asarray(margin, dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """A (H, W) uint8 array -> the bytes of an 8-bit grayscale PNG file.

    The whole format for this one case: signature, IHDR, one IDAT (zlib level 1 of the rows, each
    prefixed with filter type 0), IEND. A quarter of the time Pillow's ``Image.save`` takes for these
    small images, and zlib releases the GIL, so writer threads run in parallel.
    """
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"encode_png: expected a 2-D uint8 array, got {array.dtype} {array.shape}")
    height, width = array.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)
    rows[:, 1:] = array
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) \
        + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(array: np.ndarray, path: Path) -> None:
    Path(path).write_bytes(encode_png(array))
