"""Metrics that separate what FMD mixes: fidelity from diversity, per-class accuracy, copies of training
images, and whether synthetic images can train a classifier.

- **Precision / recall** (Kynkaanniemi et al., 2019, "Improved Precision and Recall Metric for Assessing
  Generative Models"): each set's manifold is the union of balls around its points reaching their k-th
  nearest neighbour; precision is the share of generated points inside the real manifold (fidelity),
  recall the share of real points inside the generated one (diversity).
- **Density / coverage** (Naeem et al., 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models"): density counts how many real balls hold each generated point, divided by k (about 1 when the
  two sets come from one distribution, above 1 where generated points crowd dense real regions); coverage
  is the share of real balls that hold at least one generated point (robust to outliers in the fakes).
- **Memorization**: each generated image's distance to its nearest training image, against the same
  distance for real images the generator never saw.
- **Class accuracy** and **usefulness** (train on synthetic, test on real: Ravuri & Vinyals, 2019,
  "Classification Accuracy Score for Conditional Generative Models"), both with the MedNIST classifier.
- **Two-sample test** (Lopez-Paz & Oquab, 2017, "Revisiting Classifier Two-Sample Tests"): how well a network
  trained from scratch tells generated images from real ones; in neither feature space.

Points are rows: (N, D) features, or images (N, 1, 64, 64) that are flattened to pixel vectors. Balls
are closed (a point at exactly the radius is inside), as in Kynkaanniemi et al.'s code.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .classifier import CLASSES, MedNISTClassifier, fit, load_classifier, to_evaluation_pixels
from ..errors import MednistGanError

BLOCK = 1 << 24  # distances computed at once: 64 MB of float32 (e.g. 1,677 queries x 10,000 references)


# ----------------------------------------------------------------------------- distances

def _rows(what: str, name: str, x: torch.Tensor, at_least: int = 1) -> torch.Tensor:
    """``x`` as a float (N, D) tensor of finite values with at least ``at_least`` rows, or a one-line error."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise MednistGanError(f"{what}: {name} must be a tensor of rows (N, D) or images (N, C, H, W), got {got}")
    if len(x) < at_least:
        raise MednistGanError(f"{what}: {name} has {len(x)} rows, needs at least {at_least}")
    x = x.flatten(1)
    x = x if x.is_floating_point() else x.float()
    if not torch.isfinite(x).all():
        raise MednistGanError(f"{what}: {name} has non-finite values (NaN or inf)")
    return x


def _same_width(what: str, **sets: torch.Tensor) -> None:
    widths = {name: x.shape[1] for name, x in sets.items()}
    if len(set(widths.values())) > 1:
        raise MednistGanError(f"{what}: rows of different sizes, " + ", ".join(f"{n} {w}" for n, w in widths.items()))


def _check_k(what: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MednistGanError(f"{what}: k must be an integer >= 1, got {k!r}")


def _squared_blocks(queries: torch.Tensor, reference: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first query row, squared distances of a chunk of queries to every reference row), float32.

    ||a||^2 + ||b||^2 - 2ab after subtracting the reference mean, which keeps the norms, and so the
    cancellation error, small: about 1e-7 of the centred squared norms. Clamped at 0.
    """
    centre = reference.float().mean(0)
    ref = reference.float() - centre
    ref_sq = ref.square().sum(1)
    rows = max(1, BLOCK // len(ref))
    for start in range(0, len(queries), rows):
        q = queries[start:start + rows].float() - centre
        yield start, torch.addmm(ref_sq, q, ref.T, alpha=-2).add_(q.square().sum(1, keepdim=True)).clamp_(min=0)


def _kth_nearest(queries: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Each query's distance to its k-th nearest reference row (float64). The k candidates are found in
    float32 and their distances recomputed exactly in float64, so an exact copy is at distance 0."""
    out = []
    for start, d2 in _squared_blocks(queries, reference):
        rows = torch.arange(len(d2))
        if exclude_self:
            d2[rows, start + rows] = float("inf")
        index = d2.topk(k, dim=1, largest=False).indices
        q = queries[start:start + len(d2)].double()
        exact = torch.stack([(q - reference[index[:, j]].double()).norm(dim=1) for j in range(k)], 1)
        out.append(exact.sort(dim=1).values[:, k - 1])
    return torch.cat(out)


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """L2 distance (float64, shape (N,)) from each query row to its nearest reference row.

    With ``exclude_self`` the queries are the reference's first rows (query i is reference row i) and each row's own
    entry is skipped: its nearest *other* row, so a duplicate elsewhere in the set still counts at distance 0.
    Computed in chunks: 10,000 x 10,000 pixel vectors (4,096 values) took 14-16 s on the project's 2-core
    CPU while another job ran, and about 400 MB besides the inputs.
    """
    what = "nearest_distances"
    queries, reference = _rows(what, "queries", queries), _rows(what, "reference", reference, 1 + exclude_self)
    _same_width(what, queries=queries, reference=reference)
    if exclude_self and len(queries) > len(reference):
        raise MednistGanError(f"{what}: exclude_self needs the queries to be the reference's first rows, "
                              f"got {len(queries)} queries and {len(reference)} reference rows")
    return _kth_nearest(queries, reference, 1, exclude_self)


def _radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set: its ball's radius."""
    return _kth_nearest(points, points, k, exclude_self=True)


def _ball_counts(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point, the number of balls (centres, radii) that hold it."""
    limits = radii.square().float()
    return torch.cat([(d2 <= limits).sum(1) for _, d2 in _squared_blocks(points, centres)])


# ----------------------------------------------------------------------------- fidelity and diversity

def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al. (2019)'s precision and recall with k-nearest-neighbour manifolds.

    Precision: the share of fake points within the k-th-neighbour radius of some real point (fidelity;
    a collapsed generator keeps it high). Recall: the share of real points within the radius of some fake
    point (diversity; low when the generator covers only part of the real images). Both in [0, 1].
    """
    what = "precision_recall"
    _check_k(what, k)
    real, fake = _rows(what, "real", real, k + 1), _rows(what, "fake", fake, k + 1)
    _same_width(what, real=real, fake=fake)
    precision = (_ball_counts(fake, real, _radii(real, k)) > 0).double().mean()
    recall = (_ball_counts(real, fake, _radii(fake, k)) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Naeem et al. (2020)'s density and coverage, both from balls around the real points only.

    Density: the number of (real ball, fake point) pairs with the point inside, divided by k and by the
    number of fake points. About 1 for two samples of one distribution; it can exceed 1 when fakes crowd
    where real points are dense. Coverage: the share of real points whose ball holds at least one fake
    point, in [0, 1] (about 1 - 2^-k for two equal-sized samples of one distribution).
    """
    what = "density_coverage"
    _check_k(what, k)
    real, fake = _rows(what, "real", real, k + 1), _rows(what, "fake", fake)
    _same_width(what, real=real, fake=fake)
    radii = _radii(real, k)
    density = _ball_counts(fake, real, radii).double().sum() / (k * len(fake))
    coverage = (_kth_nearest(real, fake, 1, exclude_self=False) <= radii).double().mean()
    return float(density), float(coverage)


# ----------------------------------------------------------------------------- memorization

def memorization(generated: torch.Tensor, held_out: Optional[torch.Tensor], train: torch.Tensor,
                 percentile: float = 1.0, held_out_rows: int = 1000) -> dict:
    """How many generated images sit closer to a training image than real unseen images do.

    The three sets are rows in one space (flattened pixels, or features); call once per space. Real
    held-out images land close to a training image only by chance: the ``percentile``-th percentile of
    their nearest-training distances is the ``threshold``. Returns ``share``: the fraction of generated
    images no further than that from their nearest training image (about percentile / 100 for a
    generator that does not copy, near 1 for one that returns training images), ``threshold``, the
    median nearest-training distance of the generated (``generated_median``) and held-out
    (``held_out_median``) images, and ``percentile``.

    "No further", not "closer": MedNIST holds exact duplicates (14 of 1,000 AbdomenCT images and 10 of 1,000
    HeadCT images have a pixel-identical twin among the other images of their class), so the threshold
    can be 0, and an exact copy must still count.

    Without real unseen images (``held_out`` None: a generator trained on every real image there is), the
    first ``held_out_rows`` training rows stand in for them, each measured to its nearest *other* training
    row (shuffle ``train`` first). On 2,000 Hand images this gave a 1st percentile of 6.46 and a median of
    8.85 in pixels, against 6.21 and 8.96 for real held-out images.

    The spaces see different copies: training images with Gaussian pixel noise of 0.01 (2.5 grey levels)
    were all flagged in pixels but 11% in the classifier's features, which move further under such noise
    than from one real hand to another.
    """
    what = "memorization"
    if not 0 < percentile < 100:
        raise MednistGanError(f"{what}: percentile must be in (0, 100), got {percentile}")
    stand_in = held_out is None
    if stand_in:
        train = _rows(what, "train", train, 2)
        held_out = train[:min(held_out_rows, len(train) - 1)]
    generated, held_out, train = (_rows(what, name, x) for name, x in
                                  (("generated", generated), ("held_out", held_out), ("train", train)))
    needed = math.ceil(100 / percentile)  # so that at least one held-out image lies below the percentile
    if len(held_out) < needed:
        raise MednistGanError(f"{what}: held_out has {len(held_out)} rows; "
                              f"percentile={percentile:g} needs at least {needed}")
    _same_width(what, generated=generated, held_out=held_out, train=train)
    to_generated, to_held_out = nearest_distances(generated, train), nearest_distances(held_out, train, stand_in)
    threshold = torch.quantile(to_held_out, percentile / 100)
    return {"share": float((to_generated <= threshold).double().mean()), "threshold": float(threshold),
            "generated_median": float(to_generated.median()), "held_out_median": float(to_held_out.median()),
            "percentile": percentile}


# ----------------------------------------------------------------------------- the classifier's view

def checked_images(what: str, name: str, images: torch.Tensor, at_least: int = 1) -> torch.Tensor:
    """Images (N, 1, S, S) of finite values, N >= ``at_least``, or a one-line error."""
    square = isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 1 \
        and images.shape[2] == images.shape[3]
    if not square or len(images) < at_least:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MednistGanError(f"{what}: {name} images must be a tensor (N, 1, S, S) with N >= {at_least}, got {got}")
    if not torch.isfinite(images).all():
        raise MednistGanError(f"{what}: {name} images have non-finite values (NaN or inf)")
    return images


def _labelled(what: str, name: str, images: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, S, S) and integer labels (N,) in CLASSES order, or a one-line error."""
    images = checked_images(what, name, images)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.is_floating_point() or labels.is_complex():
        raise MednistGanError(f"{what}: {name} labels must be {len(images)} integers (one per image), "
                              f"got {labels.dtype} {tuple(labels.shape)}")
    if not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES):
        raise MednistGanError(f"{what}: {name} labels must be class indices 0-{len(CLASSES) - 1} "
                              f"({', '.join(CLASSES)}), got {int(labels.min())}..{int(labels.max())}")
    return images, labels.long()


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels, classifier: Union[nn.Module, Path, None] = None,
                   batch_size: int = 500) -> dict[str, float]:
    """The share of images of each class that the classifier assigns to that class.

    ``images`` (N, 1, 64, 64) in [0, 1] are scored as users get them (uint8 levels,
    ``to_evaluation_pixels``); ``labels`` are the classes they are meant to show (indices into
    ``CLASSES``). ``classifier`` is a loaded module (used on its device, put in eval mode) or weights to
    load; by default the shipped one. Returns one entry per class present in ``labels``, by name, and
    ``"all"``: the share over every image.
    """
    images, labels = _labelled("class_accuracy", "the", images, labels)
    net = classifier if isinstance(classifier, nn.Module) else load_classifier(classifier)
    net.eval()
    device = next(net.parameters()).device
    predicted = torch.cat([net(to_evaluation_pixels(images[i:i + batch_size]).to(device)).argmax(1).cpu()
                           for i in range(0, len(images), batch_size)])
    correct = (predicted == labels).double()
    result = {name: float(correct[labels == c].mean()) for c, name in enumerate(CLASSES) if (labels == c).any()}
    result["all"] = float(correct.mean())
    return result


def _train(images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float,
           seed: int, num_classes: int = len(CLASSES)) -> MedNISTClassifier:
    """``train_classifier``'s recipe (``classifier.fit``) on images in memory, with the learning rate decayed
    linearly to 0: without the decay, one of a few 2-epoch runs on 500 images per class ended with a class at
    58% held-out accuracy. Seeds a forked RNG: the caller's random streams stay as they were.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MedNISTClassifier(num_classes)
    return fit(net, images, labels, epochs, batch_size, lr, seed, decay_to_zero=True)


def usefulness(synthetic_images: torch.Tensor, synthetic_labels, real_train_images: torch.Tensor, real_train_labels,
               real_test_images: torch.Tensor, real_test_labels, epochs: int = 2, batch_size: int = 32,
               lr: float = 1e-3, seed: int = 0, threads: int = 2) -> dict:
    """Train on synthetic, test on real (Ravuri & Vinyals, 2019's Classification Accuracy Score).

    Trains ``MedNISTClassifier`` from scratch on the synthetic images and, as the baseline, on real
    training images with the same count per class (a seeded draw), with one recipe, seed and shuffle;
    both are scored on the real test images. All images are quantised as users get them. Every class in
    the test set needs synthetic images. Runs on the CPU with ``threads`` threads, restored afterwards (on
    a CPU another job is using, 1 thread ran 8x faster than 2, with the same numbers).

    Returns ``synthetic_accuracy`` and ``real_accuracy`` (each ``class_accuracy``'s dict: per class and
    ``"all"``), ``train_images_per_class`` (each side's training count per class), ``train_images``,
    ``test_images``, ``epochs`` and ``seconds`` (both trainings and tests).
    """
    what = "usefulness"
    synthetic_images, synthetic_labels = _labelled(what, "synthetic", synthetic_images, synthetic_labels)
    real_train_images, real_train_labels = _labelled(what, "real training", real_train_images, real_train_labels)
    real_test_images, real_test_labels = _labelled(what, "real test", real_test_images, real_test_labels)
    check_counts(what, epochs=epochs, batch_size=batch_size, threads=threads)
    counts = torch.bincount(synthetic_labels, minlength=len(CLASSES)).tolist()
    missing = [CLASSES[c] for c in real_test_labels.unique().tolist() if counts[c] == 0]
    if missing:
        raise MednistGanError(f"{what}: no synthetic images of {', '.join(missing)}, which the real test set has")
    draw = torch.Generator().manual_seed(seed)
    matched = []
    for c, n in enumerate(counts):
        pool = (real_train_labels == c).nonzero().flatten()
        if len(pool) < n:
            raise MednistGanError(f"{what}: {n} synthetic {CLASSES[c]} images, but only {len(pool)} real training "
                                  "images of that class to match them")
        matched.append(pool[torch.randperm(len(pool), generator=draw)[:n]])
    matched = torch.cat(matched)
    sets = {"synthetic": (synthetic_images, synthetic_labels),
            "real": (real_train_images[matched], real_train_labels[matched])}
    started = time.perf_counter()
    with _cpu_threads(threads):
        result = {f"{name}_accuracy": class_accuracy(real_test_images, real_test_labels,
                                                     _train(to_evaluation_pixels(x), y, epochs, batch_size, lr, seed))
                  for name, (x, y) in sets.items()}
    return {**result, "train_images_per_class": {CLASSES[c]: n for c, n in enumerate(counts) if n},
            "train_images": len(synthetic_labels), "test_images": len(real_test_labels), "epochs": epochs,
            "seconds": round(time.perf_counter() - started, 1)}


def check_counts(what: str, **counts: int) -> None:
    """Each count an integer >= 1, or a one-line error naming it."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MednistGanError(f"{what}: {name} must be an integer >= 1, got {value!r}")


@contextlib.contextmanager
def _cpu_threads(threads: int) -> Iterator[None]:
    """Torch's CPU threads set to ``threads`` for the block, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _margin(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Each image's logit for "candidate" minus its logit for "real"."""
    logits = torch.cat([net(to_evaluation_pixels(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])
    return logits[:, 1] - logits[:, 0]


def two_sample_test(real: torch.Tensor, candidate: torch.Tensor, epochs: int = 2, batch_size: int = 32,
                    lr: float = 1e-3, seed: int = 0, threads: int = 2) -> dict:
    """A classifier two-sample test: can a network tell ``candidate`` images from ``real`` ones?

    Both sides are quantised as users get them and cut to the smaller count N; a seeded half of each trains
    ``MedNISTClassifier`` with two outputs from scratch (``usefulness``'s recipe), the other halves test it.
    ``auc``, the measure, is the chance that a test candidate scores above a test real image (ties count half):
    0.5 for sets that cannot be told apart, 1.0 for sets always told apart. ``accuracy`` (the sign of the score)
    says the same only once training has also set the network's bias, which a few dozen steps do not. It is a
    check that a set passes for real, not a distance: with 1,000 training images per side it tells even slightly
    blurred images from real ones (docs/benchmarks.md, section 8). Runs on the CPU with ``threads`` threads,
    restored afterwards.

    Returns ``accuracy``, ``auc``, ``train_images`` and ``test_images`` (both sides), ``epochs`` and ``seconds``.
    """
    what = "two-sample test"
    real, candidate = checked_images(what, "real", real, 4), checked_images(what, "candidate", candidate, 4)
    if real.shape[1:] != candidate.shape[1:]:
        raise MednistGanError(f"{what}: real images are {tuple(real.shape[1:])}, candidate images "
                              f"{tuple(candidate.shape[1:])}; expected one size")
    check_counts(what, epochs=epochs, batch_size=batch_size, threads=threads)
    n = min(len(real), len(candidate))
    draw = torch.Generator().manual_seed(seed)
    halves = [side[torch.randperm(len(side), generator=draw)[:n]] for side in (real, candidate)]
    train_n = n // 2
    x_train = to_evaluation_pixels(torch.cat([side[:train_n] for side in halves]))
    y_train = torch.arange(2).repeat_interleave(train_n)
    started = time.perf_counter()
    with _cpu_threads(threads):
        net = _train(x_train, y_train, epochs, batch_size, lr, seed, num_classes=2)
        real_score, candidate_score = (_margin(net, side[train_n:]) for side in halves)
    correct = (real_score <= 0).sum() + (candidate_score > 0).sum()
    above = (candidate_score[:, None] > real_score[None, :]).double().mean()
    tied = (candidate_score[:, None] == real_score[None, :]).double().mean()
    return {"accuracy": float(correct) / (2 * (n - train_n)), "auc": float(above + tied / 2),
            "train_images": 2 * train_n, "test_images": 2 * (n - train_n), "epochs": epochs,
            "seconds": round(time.perf_counter() - started, 1)}
