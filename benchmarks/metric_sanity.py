"""The metrics' sanity table: how both feature spaces react to damaged real images and to real generators.

Two disjoint halves of N real Hand images: the first is the reference, the second is scored as it is (the
real-vs-real floor), blurred (Gaussian sigma 0.5, 1.0, 1.5), upside down, transposed, replaced by uniform noise,
and replaced by a handful of reference images repeated (mode collapse); beside them the seed bundle's generator
and the shipped one. FMD/KID use the classifier's features, FD-SSL and precision/recall/density/coverage the
self-supervised encoder's.

    python benchmarks/metric_sanity.py [--data ../shared/data/mednist] [--num-samples 2000] [--out sanity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import SEED_WEIGHTS, machine  # noqa: E402

SHIPPED = REPO / "mednist_gan" / "assets" / "generator" / "model.pt"


def sanity_cases(reference: torch.Tensor, other: torch.Tensor, generators: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Images to score against ``reference``: ``other`` real images as they are and damaged, then generators'."""
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.quality.evaluate import sample_images
    from mednist_gan.quality.scores import blurred

    n = len(other)
    cases = {"real (floor)": other}
    cases.update({f"blurred, sigma {s}": blurred(other, s) for s in (0.5, 1.0, 1.5)})
    cases.update({"upside down": other.flip(-1),  # MONAI orientation: the picture's rows run along the last axis
                  "transposed": other.transpose(-1, -2), "uniform noise": torch.rand_like(other),
                  "8 training images repeated": reference[:8].repeat(n // 8 + 1, 1, 1, 1)[:n]})
    for name, path in generators.items():
        opened = open_generator(path)
        cases[name] = sample_images(opened.network, opened.latent_size, n, 1, "normal", source=path)
    return cases


def main() -> int:
    from mednist_gan.quality.evaluate import load_real_images, split_halves
    from mednist_gan.quality.scores import QualityMeter, Scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args()
    print(machine())
    reference, other = split_halves(load_real_images(args.data / "Hand"), args.num_samples, seed=0)
    meter = QualityMeter(reference)
    generators = {"seed bundle generator": SEED_WEIGHTS, "shipped generator": SHIPPED}
    cases = sanity_cases(reference, other, {k: v for k, v in generators.items() if v.is_file()})
    print(f"N = {args.num_samples} per side; real images' diversity {meter.real_diversity:.4f}")
    print(f"{'':28} {Scores.header()} {'kid_ssl':>8}")
    table = {}
    for name, images in cases.items():
        scores = meter.score(images)
        table[name] = asdict(scores)
        print(f"{name:28} {scores.row()} {scores.kid_ssl:8.5f}")
    if args.out:
        args.out.write_text(json.dumps({"num_samples": args.num_samples, "machine": machine(), "rows": table},
                                       indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
