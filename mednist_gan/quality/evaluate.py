"""The ``evaluate`` command: sample-quality numbers that need no internet, each beside its real-vs-real floor.

The scores (``scores.py``): FMD and KID in the MedNIST classifier's features, FD-SSL, KID-SSL,
precision/recall and density/coverage in the self-supervised encoder's, diversity (MS-SSIM). Besides:
**memorization** (the share of generated images closer to a training image than 99% of real unseen images
are, in pixels and in encoder features), **class accuracy** (the share the classifier assigns to the intended
class) and, for a conditional generator of all six classes, **usefulness** (a classifier trained on
generated images only, tested on real ones).

Every number has a floor: the same number for real images (two disjoint halves, real held-out images, a
classifier trained on real images). Images are compared as users get them: MONAI orientation, truncated to
uint8 levels like a saved PNG.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from . import metrics
from .classifier import CLASSES, EVALUATION_SIZE, to_evaluation_pixels
from .scores import QualityMeter, Scores, blurred
from ..data import list_images, load_images, scale_intensity, square_size
from ..errors import MednistGanError, output_error
from ..files import write_atomic
from ..generator.generate import make_latents, run_generator
from ..generator.loader import OpenedGenerator, open_generator
from ..terminal import progress_bar

def load_real_images(real_dir: Path, cache_dir: Optional[str] = "~/.cache/mednist_gan") -> torch.Tensor:
    """A folder of real square images (all of the first one's size), scaled to [0, 1] as training scales them
    (MONAI orientation)."""
    files = list_images(Path(real_dir))
    return scale_intensity(load_images(files, square_size(files[0]), cache_dir))


def split_halves(real: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint, seeded halves of ``n`` images each."""
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    return real[order[:n]], real[order[n:2 * n]]


def sample_images(model: Callable[..., torch.Tensor], latent_size: int, n: int, seed: int,
                  latent: str, batch_size: int = 500, device: str | torch.device = "cpu",
                  source: Optional[Path] = None, progress: Optional[str] = None,
                  label: Optional[int] = None, size: int = 64) -> torch.Tensor:
    """N images from seeded latents; with ``source`` (the model's file) the output is held to the documented
    interface, (N, 1, size, size), in one line; ``progress`` names a bar shown on a terminal. ``label``: the class
    index for a class-conditional generator, called as ``model(latents, labels)``."""
    latents = make_latents(n, latent_size, seed, latent)
    out = []
    with torch.inference_mode(), progress_bar(n, progress or "", enabled=progress is not None) as bar:
        for i in range(0, n, batch_size):
            batch = latents[i:i + batch_size].to(device)
            labels = None if label is None else torch.full((len(batch),), label, dtype=torch.long, device=device)
            if source is not None:
                images = run_generator(model, batch, source, (size, size), labels)
            else:
                images = model(batch) if labels is None else model(batch, labels)
            out.append(images.float().cpu())
            bar.update(len(batch))
    return torch.cat(out)


@dataclass
class _Contender:
    """A generator to score: its row name, the path it was given as, the latent distributions to sample."""

    name: str
    path: Path
    latents: tuple[str, ...]
    generator: OpenedGenerator

    def sample(self, n: int, seed: int, latent: str, device: str, class_name: Optional[str], size: int,
               progress: Optional[str] = None) -> torch.Tensor:
        """``n`` images of ``class_name`` (None: an unconditional generator's), held to the documented interface
        at the real images' ``size``."""
        return sample_images(self.generator.network, self.generator.latent_size, n, seed, latent, device=device,
                             source=self.path, progress=progress, label=self.generator.label(class_name), size=size)


def _open_contenders(models: list[tuple[str, Path, tuple[str, ...]]], classes: list[Optional[str]],
                     latent_size: Optional[int], device: str) -> list[_Contender]:
    contenders = []
    for name, path, latents in models:
        generator = open_generator(path, latent_size)
        own = generator.classes
        if own is None and len(classes) > 1:
            raise MednistGanError(f"--model {path}: an unconditional generator (one class); scoring it against "
                                  f"{len(classes)} classes needs a class-conditional one (export.json 'classes')")
        if own is not None:
            missing = [c for c in classes if c not in own]
            if None in classes or missing:
                raise MednistGanError(f"--model {path}: a class-conditional generator of {', '.join(own)}; "
                                      f"name the class to score with --class (got {missing or 'none'})")
        generator.network = generator.network.to(device)
        contenders.append(_Contender(name, Path(path), latents, generator))
    return contenders


def _class_folders(real_dir: Path, classes: Optional[list[str]]) -> list[tuple[Optional[str], Path]]:
    """(class name, folder) pairs: ``real_dir`` itself without ``classes`` (named when it is a class folder)."""
    real_dir = Path(real_dir)
    if not classes:
        return [(real_dir.name if real_dir.name in CLASSES else None, real_dir)]
    if classes == ["all"]:
        classes = [c for c in CLASSES if (real_dir / c).is_dir()]
        if not classes:
            raise MednistGanError(f"--real-dir {real_dir}: no MedNIST class folders ({', '.join(CLASSES)}) "
                                  "for --class all")
    for name in classes:
        if not (real_dir / name).is_dir():
            raise MednistGanError(f"--class {name}: no folder {real_dir / name} "
                                  "(--real-dir must hold the class folders)")
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
    generator ``open_generator`` opens; ``latent_size`` is for those that cannot tell theirs.
    ``usefulness`` (images per class; 0 = off): also train the classifier's architecture on that many generated
    images of every class (conditional generators only) and test it on real held-out images, beside the same
    training on as many real images. ``blur`` (Gaussian sigmas): also score the floor's real images blurred with
    each, the yardstick of the shipped generators' quality targets ("no worse than real images blurred with
    sigma 1.5", docs/quality.md).
    """
    if any(not (sigma > 0) for sigma in blur):
        raise MednistGanError(f"--blurred {', '.join(f'{sigma:g}' for sigma in blur)}: expected Gaussian sigmas > 0")
    folders = _class_folders(real_dir, classes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    contenders = _open_contenders(models, [name for name, _ in folders], latent_size, device)  # fail early
    unconditional = any(contender.generator.classes is None for contender in contenders)
    if usefulness and (sorted(name for name, _ in folders) != sorted(CLASSES) or unconditional):
        raise MednistGanError(f"--usefulness: needs class-conditional generators scored on all six classes "
                              f"({', '.join(CLASSES)}; --class all)")
    blocks = []
    rows = 1 + len(blur) + sum(len(contender.latents) for contender in contenders)
    with progress_bar(len(folders) * rows, "evaluate", unit="row") as bar:
        for name, folder in folders:
            blocks.append(_evaluate_class(name, folder, contenders, num_samples, seed, classifier, encoder, pairs,
                                          device, bar, blur))
    common = {"seed": seed, "classifier": str(classifier or "shipped"), "encoder": str(encoder or "shipped"),
              "feature_size": blocks[0].pop("feature_sizes")["classifier"],
              "memorization_percentile": MEMORIZATION_PERCENTILE}
    for block in blocks[1:]:
        common["feature_sizes"] = block.pop("feature_sizes")
    if len(blocks) == 1:
        return {**common, **blocks[0]}
    result = {**common, "real_dir": str(real_dir), "classes": blocks}
    if usefulness:
        result["usefulness"] = _usefulness(contenders, Path(real_dir), [name for name, _ in folders], usefulness,
                                           seed, device)
    return result


MEMORIZATION_PERCENTILE = 1.0
HELD_OUT_FOR_MEMORIZATION = 1000  # real images whose nearest *other* real image sets the threshold


def _evaluate_class(name: Optional[str], folder: Path, contenders: list[_Contender], num_samples: Optional[int],
                    seed: int, classifier: Optional[Path], encoder: Optional[Path], pairs: int, device: str, bar,
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

    def row(title: str, contender: Optional[_Contender], latent: Optional[str], images: torch.Tensor) -> dict:
        pixels = to_evaluation_pixels(images)
        features = meter.features(pixels)
        if not measurable or latent == "blurred":  # too few real images to tell the 1% closest apart; or a yardstick
            memo = {space: {"share": None} for space in ("pixels", "encoder")}
        elif contender is None:  # real images are training images here: the floor is the unseen images' own share
            memo = {space: {"share": MEMORIZATION_PERCENTILE / 100} for space in ("pixels", "encoder")}
        else:
            memo = {space: metrics.memorization(x, None, train[space], MEMORIZATION_PERCENTILE, held_out)
                    for space, x in (("pixels", pixels.flatten(1)), ("encoder", features["encoder"]))}
        accuracy = (metrics.class_accuracy(pixels, torch.full((len(pixels),), label), meter.classifier)[name]
                    if label is not None else None)
        return {"name": title, "model": None if contender is None else str(contender.path), "latent": latent,
                **asdict(meter.score_features(features, pixels)),
                "memorization_pixels": memo["pixels"]["share"], "memorization_encoder": memo["encoder"]["share"],
                "class_accuracy": accuracy, "memorization": memo}

    rows = [row("real vs real (floor)", None, None, half_b)]
    bar.update()
    for sigma in blur:
        rows.append(row(f"real blurred, sigma {sigma:g}", None, "blurred", blurred(half_b, sigma)))
        bar.update()
    for contender in contenders:
        for latent in contender.latents:
            images = contender.sample(n, seed + 1, latent, device, name, real.shape[-1],
                                      progress=f"generate ({latent})")
            rows.append(row(contender.name, contender, latent, images))
            bar.update()
    return {"class": name, "num_samples": n, "real_dir": str(folder), "real_images": len(real),
            "real_diversity": meter.real_diversity,
            "feature_sizes": {space: int(f.shape[1]) for space, f in meter.real_features.items()}, "rows": rows}


def _usefulness(contenders: list[_Contender], real_root: Path, classes: list[str], per_class: int, seed: int,
                device: str) -> dict:
    """Train-on-synthetic, test-on-real for each conditional model, beside train-on-real (the floor)."""
    from .classifier import load_split

    split = load_split(real_root, USEFULNESS_HOLDOUT, seed)
    out = {}
    for contender in contenders:
        images, labels = [], []
        for class_name in classes:
            images.append(contender.sample(per_class, seed + 3, "normal", device, class_name, EVALUATION_SIZE))
            labels.append(torch.full((per_class,), CLASSES.index(class_name)))
        out[contender.name] = metrics.usefulness(torch.cat(images), torch.cat(labels), *split["train"], *split["test"],
                                             seed=seed)
    return out


USEFULNESS_HOLDOUT = 0.1  # the classifier's split: the same real images are held out


# The table's columns after the scores: (JSON key, width); each header is the row's key in the JSON.
ROW_COLUMNS = (("memorization_pixels", 19), ("memorization_encoder", 20), ("class_accuracy", 14))
NAME_WIDTH = 30


def format_table(result: dict) -> str:
    """The table ``evaluate`` prints: a row per row of the result, each column headed by its key in the JSON, and
    under it a legend line for each kind of column and row shown."""
    blocks = result.get("classes") or [result]
    lines = []
    for block in blocks:
        title = f"class {block['class']}: " if block["class"] else ""
        lines += [f"{title}N = {block['num_samples']} generated vs {block['num_samples']} real images "
                  f"({block['real_dir']}); real_diversity {block['real_diversity']:.4f}",
                  f"{'name':{NAME_WIDTH}} {'latent':7} {Scores.header()} "
                  + " ".join(f"{key:>{width}}" for key, width in ROW_COLUMNS)]
        for row in block["rows"]:
            scores = Scores(**{f.name: row[f.name] for f in fields(Scores)})
            values = ("-" if row[key] is None else f"{row[key]:.3f}" for key, _ in ROW_COLUMNS)
            lines.append(f"{row['name'][:NAME_WIDTH]:{NAME_WIDTH}} {row['latent'] or '-':7} {scores.row()} "
                         + " ".join(f"{value:>{width}}" for value, (_, width) in zip(values, ROW_COLUMNS)))
    lines += legend(result)
    for name, usefulness in (result.get("usefulness") or {}).items():
        lines.append(f"usefulness of {name}: a classifier trained on its images scores "
                     f"{usefulness['synthetic_accuracy']['all']:.4f} on real held-out images "
                     f"(trained on real images: {usefulness['real_accuracy']['all']:.4f})")
    return "\n".join(lines)


def legend(result: dict) -> list[str]:
    """The lines under the table: one for each kind of column and of row the table shows, none for the others."""
    rows = [row for block in (result.get("classes") or [result]) for row in block["rows"]]
    lines = ["fmd, kid: classifier features; fd_ssl, precision, recall, density, coverage: self-supervised encoder "
             "features; swd: sliced Wasserstein distance of 7x7 pixel patches (x 1,000); diversity: mean MS-SSIM of "
             "random pairs (lower = more varied)"]
    memorization = (f"memorization_pixels, memorization_encoder: share of images at most as far from a training "
                    f"image (in pixels, in encoder features) as the closest {result['memorization_percentile']:g}% "
                    f"of real unseen images (floor row: those images themselves)")
    if any(row["memorization_pixels"] is None for row in rows if row["latent"] != "blurred"):
        memorization += "; '-': fewer than 101 real images"
    lines.append(memorization)
    if any(row["class_accuracy"] is not None for row in rows):
        lines.append("class_accuracy: share of images the classifier assigns to the class")
    if any(row["class_accuracy"] is None for row in rows):
        lines.append("class_accuracy '-': --real-dir is not named after a MedNIST class (as .../Hand is)")
    lines.append("real vs real (floor): two disjoint halves of the real images scored against each other, "
                 "a perfect generator")
    if any(row["latent"] == "blurred" for row in rows):
        lines.append("real blurred, sigma S (--blurred): the floor's real images blurred, a yardstick "
                     "(memorization '-')")
    if any(row["model"] is not None and row["name"].startswith("baseline ") for row in rows):
        lines.append("baseline (--baseline): a generator to compare with, sampled with normal and uniform latents")
    return lines


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise output_error("--out", path, exc) from None
