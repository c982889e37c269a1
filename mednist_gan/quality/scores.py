"""The scores of a batch of generated images against real ones, in two feature spaces.

Feature spaces (both shipped in ``assets/``, both trained on MedNIST by the project's own commands):

- **classifier** (``classifier.py``): a CNN trained to tell the six classes apart. **FMD** (Frechet MedNIST
  Distance, ``monai.metrics.FIDMetric``'s formula) and **KID** are computed on its features.
- **encoder** (``encoder.py``): a self-supervised (SimCLR) CNN trained without labels. **FD-SSL** and
  **KID-SSL** are the same distances on its features; precision/recall and density/coverage (``metrics.py``)
  use it too. Which space agrees with the eye on blurred images and generator artefacts is measured in
  docs/quality.md.
- **pixels**: **SWD**, the sliced Wasserstein distance between the sets' 7x7 patches at three levels of a
  Laplacian pyramid (``patches.SlicedWasserstein``), a third opinion that no trained network shapes.

Besides: **diversity** (mean MS-SSIM of random pairs, ``monai.metrics.MultiScaleSSIMMetric``; a collapsed
generator scores much higher than the real images do). ``QualityMeter`` computes the real images' side once
and then scores any batch; ``evaluate.py`` puts the numbers beside their real-vs-real floor.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy
import torch

from . import metrics
from .classifier import load_classifier, to_evaluation_pixels
from .encoder import load_encoder
from .patches import SlicedWasserstein
from ..errors import MednistGanError

# 3 scales so that a 7-pixel window still fits the coarsest (16x16) scale of a 64x64 image;
# MS-SSIM's first three weights (Wang et al., 2003), renormalised.
MS_SSIM_WEIGHTS = (0.0448 / 0.6305, 0.2856 / 0.6305, 0.3001 / 0.6305)
MS_SSIM_KERNEL = 7
PRECISION_RECALL_K, DENSITY_COVERAGE_K = 3, 5  # neighbourhood sizes: Kynkaanniemi et al.'s and Naeem et al.'s defaults


@dataclass
class Scores:
    fmd: float  # Frechet distance, classifier features
    fd_ssl: float  # Frechet distance, self-supervised encoder features
    kid: float  # KID, classifier features
    kid_ssl: float  # KID, encoder features
    precision: float  # share of generated images inside the real images' k-NN manifold (encoder features)
    recall: float  # share of real images inside the generated images' manifold
    density: float  # Naeem et al.: about 1 for real images, above for images crowded where real ones are
    coverage: float  # share of real images with a generated image among their k nearest
    diversity: float  # mean pairwise MS-SSIM of the evaluated images (lower = more diverse)
    swd: float  # sliced Wasserstein distance of pixel patches, mean of three pyramid levels (x 1,000)

    # The table's columns: (JSON key, width, format); a column's header is its key in evaluate's JSON, its value the
    # JSON's value (KID unscaled). kid_ssl is in the JSON only.
    COLUMNS = (("fmd", 8, ".3f"), ("fd_ssl", 8, ".3f"), ("swd", 7, ".2f"), ("kid", 8, ".5f"), ("precision", 9, ".3f"),
               ("recall", 6, ".3f"), ("density", 7, ".3f"), ("coverage", 8, ".3f"), ("diversity", 9, ".4f"))

    @classmethod
    def header(cls) -> str:
        return " ".join(f"{key:>{width}}" for key, width, _ in cls.COLUMNS)

    def row(self) -> str:
        values = asdict(self)
        return " ".join(f"{values[key]:{width}{fmt}}" for key, width, fmt in self.COLUMNS)


class QualityMeter:
    """The real side computed once (both spaces' features, the pixel patches); then scores for any batch of images
    in [0, 1]."""

    def __init__(self, real: torch.Tensor, classifier: Optional[Path] = None, seed: int = 0,
                 pairs: int = 1000, batch_size: int = 500, device: str | torch.device = "cpu",
                 encoder: Optional[Path] = None, nets: Optional[dict[str, torch.nn.Module]] = None):
        """``nets``: another meter's feature extractors, to share instead of loading them again."""
        self.device = torch.device(device)
        self.nets = nets or {"classifier": load_classifier(classifier).to(self.device),
                             "encoder": load_encoder(encoder).to(self.device)}
        self.seed, self.pairs, self.batch_size = seed, pairs, batch_size
        pixels = to_evaluation_pixels(real)
        self.real_features = self.features(pixels)
        self.real_diversity = diversity(pixels, pairs, seed, self.device)
        self.patches = SlicedWasserstein(pixels.cpu(), seed=seed)

    @property
    def classifier(self) -> torch.nn.Module:
        return self.nets["classifier"]

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of images already quantised by ``to_evaluation_pixels``, per space (float64, CPU)."""
        return {space: torch.cat([net.features(pixels[i:i + self.batch_size].to(self.device)).double().cpu()
                                  for i in range(0, len(pixels), self.batch_size)])
                for space, net in self.nets.items()}

    def score(self, images: torch.Tensor) -> Scores:
        pixels = to_evaluation_pixels(images)
        return self.score_features(self.features(pixels), pixels)

    def score_features(self, feats: dict[str, torch.Tensor], pixels: torch.Tensor) -> Scores:
        real = self.real_features
        fewest = min(len(real["encoder"]), len(feats["encoder"])) - 1  # a handful of images: smaller neighbourhoods
        precision, recall = metrics.precision_recall(real["encoder"], feats["encoder"],
                                                     k=min(PRECISION_RECALL_K, fewest))
        density, coverage = metrics.density_coverage(real["encoder"], feats["encoder"],
                                                     k=min(DENSITY_COVERAGE_K, fewest))
        return Scores(fmd=fmd(feats["classifier"], real["classifier"]), fd_ssl=fmd(feats["encoder"], real["encoder"]),
                      kid=kid(feats["classifier"], real["classifier"], seed=self.seed),
                      kid_ssl=kid(feats["encoder"], real["encoder"], seed=self.seed),
                      precision=precision, recall=recall, density=density, coverage=coverage,
                      diversity=diversity(pixels, self.pairs, self.seed, self.device),
                      swd=self.patches.distance(pixels.cpu()))


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images (N, 1, H, W) each blurred with MONAI's ``GaussianSmooth`` in 2-D.

    The batch goes in as channels: passed (N, 1, H, W) directly, MONAI would see one 3-D image with a spatial
    axis of size 1 and, padding that axis with zeros, darken it (sigma 1.5 kept 26% of the brightness) -
    what the project's first sanity table called "blurred"."""
    from monai.transforms import GaussianSmooth

    return GaussianSmooth(sigma=sigma)(images[:, 0])[:, None]


FMD_EPS = 1e-6  # added to both covariances' diagonals when their product is singular (as FID implementations do)


def fmd(features: torch.Tensor, real_features: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets: ``monai.metrics.FIDMetric``'s formula.

    Written out because MONAI 1.6's ``FIDMetric`` calls ``scipy.linalg.sqrtm(..., disp=False)``, which newer
    SciPy releases deprecate (a test keeps the two equal where both run). A singular product (fewer images
    than features, or a feature that is zero on every image of both sets) makes SciPy's ``sqrtm`` warn that
    its result may be inaccurate; then, as FID implementations do, the square root is taken of
    (sigma_x + eps I)(sigma_y + eps I) instead. Well-conditioned inputs get exactly FIDMetric's number.
    """
    x, y = features.double().numpy(), real_features.double().numpy()
    diff = x.mean(0) - y.mean(0)
    sigma_x, sigma_y = numpy.atleast_2d(numpy.cov(x, rowvar=False)), numpy.atleast_2d(numpy.cov(y, rowvar=False))
    covmean, trouble = _sqrtm(sigma_x @ sigma_y)
    if trouble or not numpy.isfinite(covmean).all():  # a (nearly) singular product
        offset = numpy.eye(len(sigma_x)) * FMD_EPS
        covmean, _ = _sqrtm((sigma_x + offset) @ (sigma_y + offset))
    if numpy.iscomplexobj(covmean):  # numerical error can leave a tiny imaginary part
        if not numpy.allclose(numpy.diagonal(covmean).imag, 0, atol=1e-3):
            raise MednistGanError(f"FMD: imaginary component {numpy.abs(covmean.imag).max():.3g} too large")
        covmean = covmean.real
    return float(diff @ diff + numpy.trace(sigma_x) + numpy.trace(sigma_y) - 2 * numpy.trace(covmean))


def _sqrtm(matrix: numpy.ndarray) -> tuple[numpy.ndarray, bool]:
    """SciPy's matrix square root, and whether SciPy found the matrix singular or ill-conditioned (said, not shown)."""
    import scipy.linalg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(matrix)
    trouble = [w for w in caught if issubclass(w.category, scipy.linalg.LinAlgWarning)]
    for w in caught:  # anything else SciPy says still reaches the caller
        if w not in trouble:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return root, bool(trouble)


def kid(features: torch.Tensor, real_features: torch.Tensor, subsets: int = 50, subset_size: int = 1000,
        seed: int = 0) -> float:
    """Kernel Inception Distance's estimator on these features: k(x, y) = (x.y / d + 1)^3."""
    generated, real = features.double(), real_features.double()
    size = min(subset_size, len(generated), len(real))
    if size < 2:
        raise MednistGanError(f"KID needs at least 2 images on each side, got {len(generated)} and {len(real)}")
    dims = generated.shape[1]
    rng = torch.Generator().manual_seed(seed)
    off_diagonal = 1 - torch.eye(size, dtype=torch.float64)  # drops k(x, x) from the within-set sums
    values = []
    for _ in range(subsets):
        a = generated[torch.randperm(len(generated), generator=rng)[:size]]
        b = real[torch.randperm(len(real), generator=rng)[:size]]
        kaa, kbb, kab = ((a @ a.T) / dims + 1) ** 3, ((b @ b.T) / dims + 1) ** 3, ((a @ b.T) / dims + 1) ** 3
        values.append(((kaa * off_diagonal).sum() + (kbb * off_diagonal).sum()) / (size * (size - 1)) - 2 * kab.mean())
    return float(torch.stack(values).mean())


@torch.no_grad()
def diversity(images: torch.Tensor, pairs: int = 1000, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Mean MS-SSIM over ``pairs`` random pairs of distinct images (N, 1, H, W) in [0, 1]."""
    from monai.metrics import MultiScaleSSIMMetric

    n = len(images)
    if n < 2:
        raise MednistGanError(f"diversity needs at least 2 images, got {n}")
    rng = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=rng)
    second = (first + torch.randint(1, n, (pairs,), generator=rng)) % n  # never the same image
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=MS_SSIM_KERNEL, weights=MS_SSIM_WEIGHTS)
    values = metric(images[first].float().to(device), images[second].float().to(device))
    return float(values.mean())
