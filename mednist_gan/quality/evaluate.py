"""Sample-quality numbers that need no internet, in two feature spaces, each against its real-vs-real floor.

Feature spaces (both shipped in ``assets/``, both trained on MedNIST by the project's own commands):

- **classifier** (``classifier.py``): a CNN trained to tell the six classes apart. **FMD** (Frechet MedNIST
  Distance, ``monai.metrics.FIDMetric``'s formula) and **KID** are computed on its features.
- **encoder** (``encoder.py``): a self-supervised (SimCLR) CNN trained without labels. **FD-SSL** and
  **KID-SSL** are the same distances on its features; precision/recall (Kynkaanniemi et al., 2019) and
  density/coverage (Naeem et al., 2020) use it too: fidelity and diversity as separate numbers. Which space
  agrees with the eye on blurred images and generator artefacts is measured in docs/quality.md.

Besides: **diversity** (mean MS-SSIM of random pairs, ``monai.metrics.MultiScaleSSIMMetric``; a collapsed
generator scores much higher than the real images do), **memorization** (the share of generated images
closer to a training image than 99% of real unseen images are, in pixels and in encoder features),
**class accuracy** (the share the classifier assigns to the intended class) and, for a conditional generator
of all six classes, **usefulness** (a classifier trained on generated images only, tested on real ones).

Every number has a floor: the same number for real images (two disjoint halves, real held-out images, a
classifier trained on real images). Images are compared as users get them: MONAI orientation, truncated to
uint8 levels like a saved PNG.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import metrics
from .classifier import CLASSES, load_classifier, to_evaluation_pixels
from ..data import list_images, load_images, scale_intensity
from .encoder import load_encoder
from ..errors import MednistGanError, output_error
from ..files import write_atomic

# 3 scales so that a 7-pixel window still fits the coarsest (16x16) scale of a 64x64 image;
# MS-SSIM's first three weights (Wang et al., 2003), renormalised.
MS_SSIM_WEIGHTS = (0.0448 / 0.6305, 0.2856 / 0.6305, 0.3001 / 0.6305)
MS_SSIM_KERNEL = 7
PR_K, DC_K = 3, 5  # neighbourhood sizes: Kynkaanniemi et al.'s and Naeem et al.'s defaults


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

    COLUMNS = (("FMD", "fmd", 8, ".3f"), ("FD-SSL", "fd_ssl", 8, ".3f"), ("KIDx1e3", "kid", 8, ".2f"),
               ("prec", "precision", 6, ".3f"), ("recall", "recall", 6, ".3f"), ("dens", "density", 6, ".3f"),
               ("cover", "coverage", 6, ".3f"), ("MS-SSIM", "diversity", 7, ".4f"))

    @classmethod
    def header(cls) -> str:
        return " ".join(f"{title:>{width}}" for title, _, width, _ in cls.COLUMNS)

    def row(self) -> str:
        values = {**asdict(self), "kid": self.kid * 1000}
        return " ".join(f"{values[key]:{width}{fmt}}" for _, key, width, fmt in self.COLUMNS)


class QualityMeter:
    """Real reference features (both spaces) computed once; then scores for any batch of images in [0, 1]."""

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
        p, r = metrics.precision_recall(real["encoder"], feats["encoder"], k=min(PR_K, fewest))
        d, c = metrics.density_coverage(real["encoder"], feats["encoder"], k=min(DC_K, fewest))
        return Scores(fmd=fmd(feats["classifier"], real["classifier"]), fd_ssl=fmd(feats["encoder"], real["encoder"]),
                      kid=kid(feats["classifier"], real["classifier"], seed=self.seed),
                      kid_ssl=kid(feats["encoder"], real["encoder"], seed=self.seed),
                      precision=p, recall=r, density=d, coverage=c,
                      diversity=diversity(pixels, self.pairs, self.seed, self.device))


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


def sample_images(model: Callable[..., torch.Tensor], latent_size: int, n: int, seed: int,
                  latent: str, batch_size: int = 500, device: str | torch.device = "cpu",
                  source: Optional[Path] = None, progress: Optional[str] = None, label: Optional[int] = None) -> torch.Tensor:
    """N images from seeded latents; with ``source`` (the model's file) the output is held to the documented
    interface, (N, 1, 64, 64), in one line; ``progress`` names a bar shown on a terminal. ``label``: the class
    index for a class-conditional generator, called as ``model(latents, labels)``."""
    from ..generator.generate import make_latents, progress_bar, run_generator

    z = make_latents(n, latent_size, seed, latent)
    out = []
    with torch.inference_mode(), progress_bar(n, progress or "", enabled=progress is not None) as bar:
        for i in range(0, n, batch_size):
            batch = z[i:i + batch_size].to(device)
            labels = None if label is None else torch.full((len(batch),), label, dtype=torch.long, device=device)
            if source is not None:
                images = run_generator(model, batch, source, (64, 64), labels)
            else:
                images = model(batch) if labels is None else model(batch, labels)
            out.append(images.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


@dataclass
class _Model:
    name: str
    path: Path
    latents: tuple[str, ...]
    net: Callable[..., torch.Tensor]
    latent_size: int
    classes: Optional[list[str]]

    def label(self, name: Optional[str]) -> Optional[int]:
        return None if self.classes is None else self.classes.index(name)


def _load_models(models: list[tuple[str, Path, tuple[str, ...]]], classes: list[Optional[str]],
                 latent_size: Optional[int], device: str) -> list[_Model]:
    from ..generator.generate import generator_classes, load_model

    loaded = []
    for name, path, latents in models:
        net, size = load_model(path, latent_size)
        own = generator_classes(path)
        if own is None and len(classes) > 1:
            raise MednistGanError(f"--model {path}: an unconditional generator (one class); scoring it against "
                                  f"{len(classes)} classes needs a class-conditional one (export.json 'classes')")
        if own is not None:
            missing = [c for c in classes if c not in own]
            if None in classes or missing:
                raise MednistGanError(f"--model {path}: a class-conditional generator of {', '.join(own)}; "
                                      f"name the class to score with --class (got {missing or 'none'})")
        loaded.append(_Model(name, Path(path), latents, net.to(device), size, own))
    return loaded


def _class_folders(real_dir: Path, classes: Optional[list[str]]) -> list[tuple[Optional[str], Path]]:
    """(class name, folder) pairs: ``real_dir`` itself without ``classes`` (named when it is a class folder)."""
    real_dir = Path(real_dir)
    if not classes:
        return [(real_dir.name if real_dir.name in CLASSES else None, real_dir)]
    if classes == ["all"]:
        classes = [c for c in CLASSES if (real_dir / c).is_dir()]
        if not classes:
            raise MednistGanError(f"--real-dir {real_dir}: no MedNIST class folders ({', '.join(CLASSES)}) for --class all")
    for name in classes:
        if not (real_dir / name).is_dir():
            raise MednistGanError(f"--class {name}: no folder {real_dir / name} (--real-dir must hold the class folders)")
    return [(name, real_dir / name) for name in classes]


def evaluate(models: list[tuple[str, Path, tuple[str, ...]]], real_dir: Path, num_samples: Optional[int] = None,
             seed: int = 0, classifier: Optional[Path] = None, pairs: int = 1000,
             device: Optional[str] = None, latent_size: Optional[int] = None, encoder: Optional[Path] = None,
             classes: Optional[list[str]] = None, usefulness: int = 0, blur: Sequence[float] = ()) -> dict:
    """Scores of each (name, model, latent distributions) and of the real-vs-real floor, as a dict.

    ``real_dir`` is one folder of real images, or with ``classes`` (names, or ``["all"]``) the MedNIST folder
    holding the class folders: each class is scored on its own against its real images, a class-conditional
    generator sampled with that class's label. The real images of a class, their features and their diversity
    are computed once for all models; on the GPU when there is one (``device`` overrides). A model is any
    generator ``generate.load_model`` takes; ``latent_size`` is for those that cannot tell theirs.
    ``usefulness`` (images per class; 0 = off): also train the classifier's architecture on that many generated
    images of every class (conditional generators only) and test it on real held-out images, beside the same
    training on as many real images. ``blur`` (Gaussian sigmas): also score the floor's real images blurred with
    each, the yardstick of issue #17's targets ("no worse than real images blurred with sigma 1.5").
    """
    from ..generator.generate import progress_bar

    if any(not (s > 0) for s in blur):
        raise MednistGanError(f"--blurred {', '.join(f'{s:g}' for s in blur)}: expected Gaussian sigmas > 0")
    folders = _class_folders(real_dir, classes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = _load_models(models, [name for name, _ in folders], latent_size, device)  # fail early
    if usefulness and (sorted(name for name, _ in folders) != sorted(CLASSES) or any(m.classes is None for m in loaded)):
        raise MednistGanError(f"--usefulness: needs class-conditional generators scored on all six classes "
                              f"({', '.join(CLASSES)}; --class all)")
    blocks = []
    rows = 1 + len(blur) + sum(len(m.latents) for m in loaded)
    with progress_bar(len(folders) * rows, "evaluate", unit="row") as bar:
        for name, folder in folders:
            blocks.append(_evaluate_class(name, folder, loaded, num_samples, seed, classifier, encoder, pairs, device,
                                          bar, blur))
    common = {"seed": seed, "classifier": str(classifier or "shipped"), "encoder": str(encoder or "shipped"),
              "feature_size": blocks[0].pop("feature_sizes")["classifier"], "memorization_percentile": MEMORIZATION_PERCENTILE}
    for block in blocks[1:]:
        common["feature_sizes"] = block.pop("feature_sizes")
    if len(blocks) == 1:
        return {**common, **blocks[0]}
    result = {**common, "real_dir": str(real_dir), "classes": blocks}
    if usefulness:
        result["usefulness"] = _usefulness(loaded, Path(real_dir), [name for name, _ in folders], usefulness, seed, device)
    return result


MEMORIZATION_PERCENTILE = 1.0
HELD_OUT_FOR_MEMORIZATION = 1000  # real images whose nearest *other* real image sets the threshold


def _evaluate_class(name: Optional[str], folder: Path, loaded: list[_Model], num_samples: Optional[int], seed: int,
                    classifier: Optional[Path], encoder: Optional[Path], pairs: int, device: str, bar,
                    blur: Sequence[float] = ()) -> dict:
    real = load_real_images(folder)
    if len(real) < 4:
        raise MednistGanError(f"--real-dir {folder}: {len(real)} images; the real-vs-real floor needs at least 4")
    n = num_samples or min(5000, len(real) // 2)
    if 2 * n > len(real):
        raise MednistGanError(f"--num-samples {n}: the real-vs-real floor needs 2 x {n} real images, "
                              f"but --real-dir {folder} has {len(real)}")
    half_a, half_b = split_halves(real, n, seed)
    meter = QualityMeter(half_a, classifier, seed=seed, pairs=pairs, device=device, encoder=encoder)
    # Memorization: every real image is a training image of the generator (the usual case: it trained on this
    # folder); real unseen images are stood in for by a seeded subset, each measured to its nearest *other* one.
    train_pixels = to_evaluation_pixels(real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))])
    train = {"pixels": train_pixels.flatten(1), "encoder": meter.features(train_pixels)["encoder"]}
    held_out = min(HELD_OUT_FOR_MEMORIZATION, len(real) - 1)
    measurable = held_out * MEMORIZATION_PERCENTILE >= 100  # at least one unseen image below the percentile
    label = CLASSES.index(name) if name in CLASSES else None

    def row(title: str, model: Optional[_Model], latent: Optional[str], images: torch.Tensor) -> dict:
        pixels = to_evaluation_pixels(images)
        feats = meter.features(pixels)
        if not measurable or latent == "blurred":  # too few real images to tell the 1% closest apart; or a yardstick
            memo = {space: {"share": None} for space in ("pixels", "encoder")}
        elif model is None:  # real images are training images here: the floor is the unseen images' own share
            memo = {space: {"share": MEMORIZATION_PERCENTILE / 100} for space in ("pixels", "encoder")}
        else:
            memo = {space: metrics.memorization(x, None, train[space], MEMORIZATION_PERCENTILE, held_out)
                    for space, x in (("pixels", pixels.flatten(1)), ("encoder", feats["encoder"]))}
        accuracy = (metrics.class_accuracy(pixels, torch.full((len(pixels),), label), meter.classifier)[name]
                    if label is not None else None)
        return {"name": title, "model": None if model is None else str(model.path), "latent": latent,
                **asdict(meter.score_features(feats, pixels)),
                "memorization_pixels": memo["pixels"]["share"], "memorization_encoder": memo["encoder"]["share"],
                "class_accuracy": accuracy, "memorization": memo}

    rows = [row("real vs real (floor)", None, None, half_b)]
    bar.update()
    for sigma in blur:
        rows.append(row(f"real blurred, sigma {sigma:g}", None, "blurred", blurred(half_b, sigma)))
        bar.update()
    for model in loaded:
        for latent in model.latents:
            images = sample_images(model.net, model.latent_size, n, seed + 1, latent, device=device, source=model.path,
                                   progress=f"generate ({latent})", label=model.label(name))
            rows.append(row(model.name, model, latent, images))
            bar.update()
    return {"class": name, "num_samples": n, "real_dir": str(folder), "real_images": len(real),
            "real_diversity": meter.real_diversity,
            "feature_sizes": {space: int(f.shape[1]) for space, f in meter.real_features.items()}, "rows": rows}


def _usefulness(loaded: list[_Model], real_root: Path, classes: list[str], per_class: int, seed: int, device: str) -> dict:
    """Train-on-synthetic, test-on-real for each conditional model, beside train-on-real (the floor)."""
    from .classifier import load_split

    split = load_split(real_root, USEFULNESS_HOLDOUT, seed)
    out = {}
    for model in loaded:
        images, labels = [], []
        for c in classes:
            images.append(sample_images(model.net, model.latent_size, per_class, seed + 3, "normal", device=device,
                                        source=model.path, label=model.label(c)))
            labels.append(torch.full((per_class,), CLASSES.index(c)))
        out[model.name] = metrics.usefulness(torch.cat(images), torch.cat(labels), *split["train"], *split["test"],
                                             seed=seed)
    return out


USEFULNESS_HOLDOUT = 0.1  # the classifier's split: the same real images are held out


def format_table(result: dict) -> str:
    blocks = result.get("classes") or [result]
    lines = []
    for block in blocks:
        title = f"class {block['class']}: " if block["class"] else ""
        lines += [f"{title}N = {block['num_samples']} generated vs {block['num_samples']} real images "
                  f"({block['real_dir']}); real images' own diversity {block['real_diversity']:.4f}",
                  f"{'':30} {'latent':7} {Scores.header()} {'memo-px':>7} {'memo-ssl':>8} {'class':>6}"]
        for row in block["rows"]:
            scores = Scores(**{f.name: row[f.name] for f in fields(Scores)})
            acc = "-" if row["class_accuracy"] is None else f"{row['class_accuracy']:.3f}"
            px, ssl = ("-" if row[key] is None else f"{row[key]:.3f}" for key in ("memorization_pixels", "memorization_encoder"))
            lines.append(f"{row['name'][:30]:30} {row['latent'] or '-':7} {scores.row()} {px:>7} {ssl:>8} {acc:>6}")
    lines.append(f"FMD, KID: classifier features; FD-SSL, prec/recall/dens/cover, memo-ssl: self-supervised encoder "
                 f"features; memo: share at most as far from a training image as the closest "
                 f"{result['memorization_percentile']:g}% of real unseen images (floor row: real unseen images "
                 f"themselves; '-' with fewer than 101 real images); class: share the classifier assigns to the class; "
                 f"'real blurred' rows: the floor's real images blurred, a yardstick")
    for name, u in (result.get("usefulness") or {}).items():
        lines.append(f"usefulness of {name}: a classifier trained on its images scores {u['synthetic_accuracy']['all']:.4f} "
                     f"on real held-out images (trained on real images: {u['real_accuracy']['all']:.4f})")
    return "\n".join(lines)


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise output_error("--out", path, exc) from None
