"""How FMD, KID and MS-SSIM diversity react to damaged real images: the metric's sanity table.

Two disjoint halves of N real Hand images; the second half as it is (the real-vs-real floor),
upside down, transposed, blurred (Gaussian sigma 1.5), and replaced by uniform noise.

    python benchmarks/metric_sanity.py [--data ../shared/data/mednist] [--num-samples 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.transforms import GaussianSmooth

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import machine  # noqa: E402


def main() -> int:
    from mednist_gan.quality import QualityMeter, load_real_images, split_halves

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--num-samples", type=int, default=2000)
    args = parser.parse_args()
    print(machine())
    reference, other = split_halves(load_real_images(args.data / "Hand"), args.num_samples, seed=0)
    meter = QualityMeter(reference)
    cases = {"real (floor)": other, "upside down": other.flip(-1), "transposed": other.transpose(-1, -2),
             "blurred (sigma 1.5)": GaussianSmooth(sigma=1.5)(other), "uniform noise": torch.rand_like(other)}
    print(f"N = {args.num_samples} per side; real images' diversity {meter.real_diversity:.4f}")
    print(f"{'':22} {'FMD':>10} {'KID x1e3':>10} {'MS-SSIM':>10}")
    for name, images in cases.items():
        print(f"{name:22} {meter.score(images).row()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
