"""The metrics' sanity table: how the measures react to damaged real images and to real generators, per class.

Two disjoint halves of N real images of a class: the first is the reference, the second is scored as it is (the
real-vs-real floor), blurred (Gaussian sigma 0.5, 1.0, 1.5), upside down, transposed, replaced by uniform noise,
and replaced by a handful of reference images repeated (mode collapse); beside them the shipped generators that
make the class (for Hand: the seed bundle's, the bundle-architecture one and the Hand-only one; for every class
the six-class one). FMD/KID use the classifier's features, FD-SSL and precision/recall/density/coverage the
self-supervised encoder's; SWD (pixel patches) and ``--two-sample``'s classifier two-sample test AUC (``c2st``) are
in neither space. Each class ends with the order of the rows by each measure, whether it puts the damaged rows in
their known order (floor < sigma 0.5 < 1.0 < 1.5; every damaged row above the floor), and how far it agrees with
FD-SSL's order of all rows (Spearman's rank correlation).

    python benchmarks/metric_sanity.py [--data ../shared/data/mednist-full] [--classes Hand [CXR ...] | all]
        [--num-samples 2000] [--two-sample] [--out sanity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import SEED_WEIGHTS, machine  # noqa: E402

ASSETS = REPO / "mednist_gan" / "assets"
SHIPPED = ASSETS / "generator" / "model.pt"
HAND_ONLY = ASSETS / "hand" / "model.pt"
SIX_CLASS = ASSETS / "conditional" / "model.pt"
FLOOR, BLURS = "real (floor)", tuple(f"blurred, sigma {s}" for s in (0.5, 1.0, 1.5))
DAMAGED = (*BLURS, "upside down", "transposed", "uniform noise", "8 training images repeated")
MEASURES = ("fd_ssl", "fmd", "swd", "c2st")


def sanity_cases(reference: torch.Tensor, other: torch.Tensor, generators: dict[str, Path],
                 class_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Images to score against ``reference``: ``other`` real images as they are and damaged, then generators'
    (a class-conditional one makes ``class_name``)."""
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.quality.evaluate import sample_images
    from mednist_gan.quality.scores import blurred

    n = len(other)
    cases = {FLOOR: other}
    cases.update({name: blurred(other, s) for name, s in zip(BLURS, (0.5, 1.0, 1.5))})
    cases.update({"upside down": other.flip(-1),  # MONAI orientation: the picture's rows run along the last axis
                  "transposed": other.transpose(-1, -2),
                  "uniform noise": torch.rand(other.shape, generator=torch.Generator().manual_seed(0)),
                  "8 training images repeated": reference[:8].repeat(n // 8 + 1, 1, 1, 1)[:n]})
    for name, path in generators.items():
        opened = open_generator(path)
        cases[name] = sample_images(opened.network, opened.latent_size, n, 1, "normal", source=path,
                                    label=opened.label(class_name))
    return cases


def generators_for(class_name: str) -> dict[str, Path]:
    """The shipped generators that make ``class_name`` (those whose files are here)."""
    found = {"six-class generator": SIX_CLASS}
    if class_name == "Hand":
        found = {"seed bundle generator": SEED_WEIGHTS, "bundle-architecture generator": SHIPPED,
                 "Hand-only generator": HAND_ONLY, **found}
    return {name: path for name, path in found.items() if path.is_file()}


def known_order_holds(row: dict[str, dict], measure: str) -> bool:
    """Whether ``measure`` (lower = closer to real; c2st's AUC too) ranks floor < each blur in turn, and every
    damaged row above the floor (ties at c2st's ceiling of 1.0 count as in order)."""
    chain = [row[name][measure] for name in (FLOOR, *BLURS)]
    rising = all(a < b or a == b == 1.0 for a, b in zip(chain, chain[1:]))
    return rising and all(row[name][measure] > row[FLOOR][measure] for name in DAMAGED)


def rank_agreement(row: dict[str, dict], measure: str, other: str = "fd_ssl") -> float:
    """Spearman's rank correlation of two measures over the rows (1: the same order; no ties expected)."""
    ranks = [torch.tensor([row[name][m] for name in row]).argsort().argsort().double() for m in (measure, other)]
    n = len(row)
    return float(1 - 6 * ((ranks[0] - ranks[1]) ** 2).sum() / (n * (n * n - 1)))


def main() -> int:
    from mednist_gan.quality.classifier import CLASSES
    from mednist_gan.quality.evaluate import load_real_images, split_halves
    from mednist_gan.quality.metrics import two_sample_test
    from mednist_gan.quality.scores import QualityMeter, Scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist-full")
    parser.add_argument("--classes", nargs="+", default=["Hand"], help="MedNIST classes, or all")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--two-sample", action="store_true", help="add the classifier two-sample test's AUC")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    classes = list(CLASSES) if args.classes == ["all"] else args.classes
    print(machine())
    table, sizes = {}, {}
    for class_name in classes:
        real = load_real_images(args.data / class_name)
        n = min(args.num_samples, len(real) // 2)  # as evaluate does: BreastMRI's 8,954 images give 4,477 a side
        reference, other = split_halves(real, n, seed=0)
        meter = QualityMeter(reference)
        cases = sanity_cases(reference, other, generators_for(class_name), class_name)
        print(f"\n{class_name}: N = {n} per side; real images' diversity {meter.real_diversity:.4f}")
        print(f"{'':30} {Scores.header()} {'kid_ssl':>8}" + (f"{'c2st':>7}" if args.two_sample else ""))
        rows = table[class_name] = {}
        sizes[class_name] = n
        for name, images in cases.items():
            scores = meter.score(images)
            rows[name] = asdict(scores)
            c2st = ""
            if args.two_sample:
                rows[name]["c2st"] = two_sample_test(reference, images, threads=torch.get_num_threads())["auc"]
                c2st = f"{rows[name]['c2st']:7.4f}"
            print(f"{name:30} {scores.row()} {scores.kid_ssl:8.5f}{c2st}", flush=True)
        for measure in MEASURES if args.two_sample else MEASURES[:-1]:
            order = sorted(rows, key=lambda name: rows[name][measure])
            print(f"{measure:>7}: known order {'holds' if known_order_holds(rows, measure) else 'BROKEN'}, "
                  f"rank agreement with fd_ssl {rank_agreement(rows, measure):.2f}; " + " < ".join(order))
    if args.out:
        args.out.write_text(json.dumps({"num_samples": sizes, "machine": machine(), "classes": table},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
