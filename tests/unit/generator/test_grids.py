"""`generate --grid`: the per-class grid of `--class all` names each row's class in a left margin; any other grid is
the plain one (64-pixel tiles, 2-pixel black borders), and the tiles are the PNG files written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mednist_gan.files import PROVENANCE_FILE
from mednist_gan.generator.generate import generate
from mednist_gan.images import image_grid, label_margin

from stand_ins import ForeignGenerator

TILE, PAD = 64, 2


class TwoClassGenerator(torch.nn.Module):
    """A class-conditional stand-in: (latents, labels) -> images in [0, 1], the label shifting them."""

    def __init__(self, latent_size: int = 8):
        super().__init__()
        self.basis = torch.nn.Parameter(torch.randn(latent_size, TILE * TILE,
                                                    generator=torch.Generator().manual_seed(0)))

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents @ self.basis + 2 * labels[:, None].float() - 1).reshape(-1, 1, 64, 64)


def grey_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"  # 8-bit grey
        return np.asarray(image)


def tile(grid: np.ndarray, row: int, column: int, left: int = 0) -> np.ndarray:
    """The tile at (row, column) where the docs put it: 64-pixel tiles, 2-pixel borders, after a margin ``left``."""
    top, start = PAD + row * (TILE + PAD), left + PAD + column * (TILE + PAD)
    return grid[top:top + TILE, start:start + TILE]


def assert_labelled_rows(grid: np.ndarray, classes: list[str], columns: int, folders) -> None:
    """Each row's margin has its label drawn; the tiles are the class's first PNGs, in place and 64 x 64."""
    margin = label_margin(classes)
    assert grid.shape == (len(classes) * (TILE + PAD) + PAD, margin + columns * (TILE + PAD) + PAD)
    labels = []
    for row, name in enumerate(classes):
        top = PAD + row * (TILE + PAD)
        label = grid[top:top + TILE, :margin]
        assert (label != 0).any(), f"row {row} ({name}): nothing drawn in the margin"
        labels.append(label)
        for column in range(columns):
            expected = grey_png(folders[row] / f"sample_{column:05d}.png")
            assert np.array_equal(tile(grid, row, column, margin), expected), (name, column)
    assert all(not np.array_equal(a, b) for i, a in enumerate(labels) for b in labels[i + 1:])  # each its own name
    # Besides the margin, the grid is the plain one: black borders around the tiles.
    assert np.array_equal(grid[:, margin:], image_grid(np.stack([tile(grid, r, c, margin) for r in range(len(classes))
                                                                 for c in range(columns)]), columns))


def test_every_class_grid_names_each_row(tmp_path):
    model = tmp_path / "cond" / "generator.ts"
    model.parent.mkdir()
    torch.jit.script(TwoClassGenerator().eval()).save(str(model))
    (model.parent / PROVENANCE_FILE).write_text(json.dumps({"files": {}, "classes": ["CXR", "Hand"]}))
    generate(model, 3, tmp_path / "out", seed=1, class_name="all", grid=tmp_path / "grid.png", latent_size=8)
    assert_labelled_rows(grey_png(tmp_path / "grid.png"), ["CXR", "Hand"], 3,
                         [tmp_path / "out" / "CXR", tmp_path / "out" / "Hand"])
    # One class: one row, no label (the file name says the class).
    generate(model, 3, tmp_path / "hand", seed=1, class_name="Hand", grid=tmp_path / "hand.png", latent_size=8)
    assert grey_png(tmp_path / "hand.png").shape == (2 * (TILE + PAD) + PAD, 2 * (TILE + PAD) + PAD)


def test_the_shipped_six_class_grid_names_each_row(tmp_path):
    """`generate --class all` without --model: a row of 8 per class, in the shipped generator's class order."""
    from mednist_gan.generator.generate import SHIPPED_CONDITIONAL
    from mednist_gan.generator.loader import open_generator

    classes = open_generator(SHIPPED_CONDITIONAL).classes
    assert len(classes) == 6
    generate(SHIPPED_CONDITIONAL, 8, tmp_path / "out", class_name="all", grid=tmp_path / "grid.png", device="cpu")
    assert_labelled_rows(grey_png(tmp_path / "grid.png"), classes, 8, [tmp_path / "out" / name for name in classes])


def test_an_unconditional_grid_has_no_margin(tmp_path):
    model = tmp_path / "foreign.ts"
    torch.jit.script(ForeignGenerator(8).eval()).save(str(model))
    generate(model, 5, tmp_path / "out", grid=tmp_path / "grid.png", latent_size=8)
    grid = grey_png(tmp_path / "grid.png")
    assert grid.shape == (2 * (TILE + PAD) + PAD, 3 * (TILE + PAD) + PAD)  # 5 images: rows of 3
    assert not grid[:, :PAD].any() and not grid[:PAD].any()  # the border, then the first tile
    for i in range(5):
        assert np.array_equal(tile(grid, *divmod(i, 3)), grey_png(tmp_path / "out" / f"sample_{i:05d}.png"))


def test_row_labels_are_one_per_row_and_any_name_draws():
    pictures = np.full((4, 16, 16), 128, dtype=np.uint8)
    plain = image_grid(pictures, 2)
    labelled = image_grid(pictures, 2, labels=["Ωmega", "é"])  # beyond the bitmap font's Latin-1: drawn as '?'
    assert labelled.dtype == np.uint8 and np.array_equal(labelled[:, label_margin(["Ωmega", "é"]):], plain)
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        image_grid(pictures, 2, labels=["a", "b", "c"])
