"""The sliced Wasserstein distance of pixel patches (SWD; Karras et al., 2018, "Progressive Growing of GANs",
section 5): how far two sets of images differ in the distribution of their 7x7 patches at each level of a
Laplacian pyramid, from fine detail to the coarse layout. In neither feature space: no trained network shapes it,
so it is a third opinion beside FD-SSL and FMD (docs/benchmarks.md, section 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import check_counts, checked_images
from ..errors import MednistGanError

PYRAMID_LEVELS, PATCH = 3, 7  # 64x64 -> levels of 64, 32 and 16 pixels; a 7x7 patch fits the coarsest
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """The 5-tap binomial filter (a Gaussian of sigma about 1) along both axes, reflected edges."""
    x = F.pad(images, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, _BINOMIAL.to(x.dtype).view(1, 1, 1, 5))
    return F.conv2d(x, _BINOMIAL.to(x.dtype).view(1, 1, 5, 1))


def laplacian_pyramid(images: torch.Tensor, levels: int = PYRAMID_LEVELS) -> list[torch.Tensor]:
    """Images (N, 1, S, S), finest level first: ``levels - 1`` band-pass images (each level minus its smoothed,
    halved and re-doubled copy: the detail that halving loses), then the smoothed, halved low-pass residual."""
    bands, x = [], images.float()
    for _ in range(levels - 1):
        half = _smooth(x)[..., ::2, ::2]
        doubled = torch.zeros_like(x)
        doubled[..., ::2, ::2] = half
        bands.append(x - 4 * _smooth(doubled))
        x = half
    return bands + [x]


class SlicedWasserstein:
    """The sliced Wasserstein distance between the 7x7 patches of real images and of any other set, per pyramid level.

    Up to 64 patches at random places of each image (at most 2**18 per level; the real side drawn once), each
    set's patches scaled by that set's own mean and standard deviation (so a uniform change of brightness or
    contrast is not counted; Karras et al.'s choice), projected on ``directions`` random unit vectors; per
    direction, the 1-D Wasserstein-1 distance of the two sets of projections: the mean difference of their values
    at 2**14 evenly spaced quantiles (fewer for small sets: the smaller set's count), averaged over the directions,
    times 1,000. Blur moves the finest level most, a wrong layout (upside down, transposed) the coarsest, noise all
    of them; ``distance`` is the mean of the levels. Seeded: a set gets the same number on every call."""

    PATCHES_PER_IMAGE, MAX_PATCHES, QUANTILES = 64, 1 << 18, 1 << 14

    def __init__(self, real: torch.Tensor, directions: int = 256, seed: int = 0):
        real = self._checked("real", real)
        check_counts("sliced Wasserstein", directions=directions)
        self.seed, self.real_size = seed, real.shape[-1]
        draw = torch.Generator().manual_seed(seed)
        self.directions = F.normalize(torch.randn(directions, PATCH * PATCH, generator=draw), dim=1)
        self.real = [self._projected(level, draw) for level in laplacian_pyramid(real)]

    @staticmethod
    def _checked(name: str, images: torch.Tensor) -> torch.Tensor:
        images = checked_images("sliced Wasserstein", name, images, 2)
        smallest = PATCH << (PYRAMID_LEVELS - 1)
        if images.shape[-1] < smallest:
            raise MednistGanError(f"sliced Wasserstein: {name} images are {images.shape[-1]} pixels wide; "
                                  f"expected at least {smallest} ({PATCH}-pixel patches at the pyramid's coarsest "
                                  "level)")
        return images

    def _projected(self, level: torch.Tensor, draw: torch.Generator) -> torch.Tensor:
        """(directions, quantiles): the projections of random patches of ``level`` on each direction, at evenly
        spaced quantiles."""
        n, size = len(level), level.shape[-1]
        count = min(n * self.PATCHES_PER_IMAGE, self.MAX_PATCHES)
        image = torch.randperm(n, generator=draw).repeat(count // n + 1)[:count]
        top, left = (torch.randint(0, size - PATCH + 1, (count, 1), generator=draw) for _ in range(2))
        offsets = torch.arange(PATCH)
        patches = level[image[:, None, None], 0, (top + offsets)[:, :, None], (left + offsets)[:, None, :]].flatten(1)
        patches = (patches - patches.mean()) / patches.std().clamp_min(1e-8)
        return _at_quantiles((self.directions @ patches.T).sort(dim=1).values, min(count, self.QUANTILES))

    def levels(self, images: torch.Tensor) -> list[float]:
        """The distance at each pyramid level, finest first (x 1,000)."""
        images = self._checked("candidate", images)
        if images.shape[1:] != (1, *[self.real_size] * 2):
            raise MednistGanError(f"sliced Wasserstein: candidate images are {tuple(images.shape[1:])}, real images "
                                  f"(1, {self.real_size}, {self.real_size}); expected one size")
        draw = torch.Generator().manual_seed(self.seed + 1)
        distances = []
        for real, level in zip(self.real, laplacian_pyramid(images)):
            candidate = self._projected(level, draw)
            fewer, more = sorted((real, candidate), key=lambda x: x.shape[1])
            distances.append(float((fewer - _at_quantiles(more, fewer.shape[1])).abs().mean()) * 1000)
        return distances

    def distance(self, images: torch.Tensor) -> float:
        """The mean over the pyramid's levels (x 1,000): 0 for one set against itself, growing as they differ."""
        return sum(self.levels(images)) / PYRAMID_LEVELS


def _at_quantiles(ordered: torch.Tensor, count: int) -> torch.Tensor:
    """Each row of ``ordered`` (sorted values) at ``count`` evenly spaced quantiles, the midpoints of equal shares."""
    n = ordered.shape[1]
    return ordered if count == n else ordered[:, ((torch.arange(count) + 0.5) * n / count).long()]
