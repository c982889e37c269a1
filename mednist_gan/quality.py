"""Sample-quality numbers that need no internet: FMD, KID and MS-SSIM diversity.

- **FMD** (Frechet MedNIST Distance): the Frechet distance of ``monai.metrics.FIDMetric`` on the shipped MedNIST classifier's
  features (see ``classifier.py``) of N generated and N real images.
- **KID**: the unbiased squared MMD with the cubic polynomial kernel (Binkowski et al., 2018) on the
  same features, averaged over subsets; unbiased, so it can go slightly below 0 for equal distributions.
- **Diversity**: mean MS-SSIM (``monai.metrics.MultiScaleSSIMMetric``) over random pairs of distinct
  images; a collapsed generator scores much higher than the real images do.

Every comparison has a floor: the same numbers between two disjoint halves of the real images.
Images are compared as users get them: MONAI orientation, truncated to uint8 levels like a saved PNG.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .files import write_atomic
from .classifier import load_classifier, to_evaluation_pixels
from .data import list_images, load_images, scale_intensity
from .errors import MednistGanError, output_error

# 3 scales so that a 7-pixel window still fits the coarsest (16x16) scale of a 64x64 image;
# MS-SSIM's first three weights (Wang et al., 2003), renormalised.
MS_SSIM_WEIGHTS = (0.0448 / 0.6305, 0.2856 / 0.6305, 0.3001 / 0.6305)
MS_SSIM_KERNEL = 7


@dataclass
class Scores:
    fmd: float
    kid: float
    diversity: float  # mean pairwise MS-SSIM of the evaluated images (lower = more diverse)

    def row(self) -> str:
        return f"{self.fmd:10.3f} {self.kid * 1000:10.3f} {self.diversity:10.4f}"


class QualityMeter:
    """Real reference features computed once; then scores for any batch of images in [0, 1]."""

    def __init__(self, real: torch.Tensor, classifier: Optional[Path] = None, seed: int = 0,
                 pairs: int = 1000, batch_size: int = 500, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = load_classifier(classifier).to(self.device)
        self.seed, self.pairs, self.batch_size = seed, pairs, batch_size
        pixels = to_evaluation_pixels(real)
        self.real_features = self.features(pixels)
        self.real_diversity = diversity(pixels, pairs, seed, self.device)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Classifier features of images already quantised by ``to_evaluation_pixels``."""
        out = [self.net.features(pixels[i:i + self.batch_size].to(self.device)).double().cpu()
               for i in range(0, len(pixels), self.batch_size)]
        return torch.cat(out)

    def score(self, images: torch.Tensor) -> Scores:
        pixels = to_evaluation_pixels(images)
        feats = self.features(pixels)
        return Scores(fmd=fmd(feats, self.real_features), kid=kid(feats, self.real_features, seed=self.seed),
                      diversity=diversity(pixels, self.pairs, self.seed, self.device))


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
    sigma_x, sigma_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean, trouble = _sqrtm(sigma_x @ sigma_y)
    if trouble or not np.isfinite(covmean).all():  # a (nearly) singular product
        offset = np.eye(len(sigma_x)) * FMD_EPS
        covmean, _ = _sqrtm((sigma_x + offset) @ (sigma_y + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MednistGanError(f"FMD: imaginary component {np.abs(covmean.imag).max():.3g} too large")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean))


def _sqrtm(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
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
    x, y = features.double(), real_features.double()
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise MednistGanError(f"KID needs at least 2 images on each side, got {len(x)} and {len(y)}")
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    off = 1 - torch.eye(m, dtype=torch.float64)  # drops the diagonal (k(x, x)) from the within-set sums
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=g)[:m]]
        b = y[torch.randperm(len(y), generator=g)[:m]]
        kaa, kbb, kab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
        values.append(((kaa * off).sum() + (kbb * off).sum()) / (m * (m - 1)) - 2 * kab.mean())
    return float(torch.stack(values).mean())


@torch.no_grad()
def diversity(images: torch.Tensor, pairs: int = 1000, seed: int = 0, device: str | torch.device = "cpu") -> float:
    """Mean MS-SSIM over ``pairs`` random pairs of distinct images (N, 1, H, W) in [0, 1]."""
    from monai.metrics import MultiScaleSSIMMetric

    n = len(images)
    if n < 2:
        raise MednistGanError(f"diversity needs at least 2 images, got {n}")
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (pairs,), generator=g)
    second = (first + torch.randint(1, n, (pairs,), generator=g)) % n  # never the same image
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=MS_SSIM_KERNEL, weights=MS_SSIM_WEIGHTS)
    values = metric(images[first].float().to(device), images[second].float().to(device))
    return float(values.mean())


# ----------------------------------------------------------------------------- the evaluate command

def load_real_images(real_dir: Path, cache_dir: Optional[str] = "~/.cache/mednist_gan") -> torch.Tensor:
    """A folder of real 64x64 images, scaled to [0, 1] as training scales them (MONAI orientation)."""
    return scale_intensity(load_images(list_images(Path(real_dir)), (64, 64), cache_dir))


def split_halves(real: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, seeded halves of ``n`` images each."""
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    return real[order[:n]], real[order[n:2 * n]]


def sample_images(model: Callable[[torch.Tensor], torch.Tensor], latent_size: int, n: int, seed: int,
                  latent: str, batch_size: int = 500, device: str | torch.device = "cpu",
                  source: Optional[Path] = None, progress: Optional[str] = None) -> torch.Tensor:
    """N images from seeded latents; with ``source`` (the model's file) the output is held to the documented
    interface, (N, 1, 64, 64), in one line; ``progress`` names a bar shown on a terminal."""
    from .generate import make_latents, progress_bar, run_generator

    z = make_latents(n, latent_size, seed, latent)
    out = []
    with torch.inference_mode(), progress_bar(n, progress or "", enabled=progress is not None) as bar:
        for i in range(0, n, batch_size):
            batch = z[i:i + batch_size].to(device)
            images = model(batch) if source is None else run_generator(model, batch, source, (64, 64))
            out.append(images.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


def evaluate(models: list[tuple[str, Path, tuple[str, ...]]], real_dir: Path, num_samples: Optional[int] = None,
             seed: int = 0, classifier: Optional[Path] = None, pairs: int = 1000,
             device: Optional[str] = None, latent_size: Optional[int] = None) -> dict:
    """Scores of each (name, model, latent distributions) and of the real-vs-real floor, as a dict.

    The real images, their features and their diversity are computed once for all models; on the GPU
    when there is one (``device`` overrides). A model is any generator ``generate.load_model`` takes;
    ``latent_size`` is for those that cannot tell theirs.
    """
    from .generate import load_model, progress_bar

    real = load_real_images(real_dir)
    if len(real) < 4:
        raise MednistGanError(f"--real-dir {real_dir}: {len(real)} images; the real-vs-real floor needs at least 4")
    n = num_samples or min(5000, len(real) // 2)
    if 2 * n > len(real):
        raise MednistGanError(f"--num-samples {n}: the real-vs-real floor needs 2 x {n} real images, "
                              f"but --real-dir {real_dir} has {len(real)}")
    half_a, half_b = split_halves(real, n, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = [(name, path, latents, *load_model(path, latent_size)) for name, path, latents in models]  # fail early
    with progress_bar(1 + sum(len(latents) for _, _, latents in models), "evaluate", unit="row") as bar:
        meter = QualityMeter(half_a, classifier, seed=seed, pairs=pairs, device=device)
        rows = [{"name": "real vs real (floor)", "model": str(real_dir), "latent": None,
                 **asdict(meter.score(half_b))}]
        bar.update()
        for name, path, latents, net, size in loaded:
            net = net.to(device)
            for latent in latents:
                images = sample_images(net, size, n, seed + 1, latent, device=device, source=path,
                                       progress=f"generate ({latent})")
                rows.append({"name": name, "model": str(path), "latent": latent, **asdict(meter.score(images))})
                bar.update()
    return {"num_samples": n, "real_dir": str(real_dir), "real_images": len(real), "seed": seed,
            "real_diversity": meter.real_diversity, "feature_size": int(meter.real_features.shape[1]),
            "classifier": str(classifier or "shipped"), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"N = {result['num_samples']} generated vs {result['num_samples']} real images "
             f"({result['real_dir']}); real images' own diversity {result['real_diversity']:.4f}",
             f"{'':34} {'latent':8} {'FMD':>10} {'KID x1e3':>10} {'MS-SSIM':>10}"]
    for row in result["rows"]:
        scores = Scores(row["fmd"], row["kid"], row["diversity"])
        lines.append(f"{row['name'][:34]:34} {row['latent'] or '-':8} {scores.row()}")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise output_error("--out", path, exc) from None
