"""Data path: augmented images/s, MONAI's per-sample random transforms vs mednist-gan's batched ones.

Both start from the same decoded, intensity-scaled Hand images in memory (what the bundle's
``CacheDataset`` holds) and apply the bundle's augmentation: RandRotated(+-15 deg, p=0.5),
RandFlipd(axis 0, p=0.5), RandZoomd(0.9-1.1, p=0.5). MONAI runs them per sample in this one
process (one core: multiply by the DataLoader workers you would give it); ours runs them batched on
the training device (CPU here, all its threads: that is what the trainer does). Same process.

    python benchmarks/bench_data.py [--images 600] [--data ../shared/data/mednist]

Prints images/s for both, the ratio, and PASS/FAIL against the 50x target (exit 1 on FAIL).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import machine, verdict  # noqa: E402

TARGET = 50.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="images per pass (one training batch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    args = parser.parse_args()

    import torch
    from monai.transforms import Compose, RandFlipd, RandRotated, RandZoomd

    from mednist_gan.data import augment, list_images, load_images, scale_intensity

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = scale_intensity(load_images(list_images(args.data / "Hand")[: args.images]))
    monai_aug = Compose([
        RandRotated(keys="image", range_x=math.pi / 12, prob=0.5, keep_size=True),
        RandFlipd(keys="image", spatial_axis=0, prob=0.5),
        RandZoomd(keys="image", min_zoom=0.9, max_zoom=1.1, prob=0.5),
    ]).set_random_state(0)
    samples = [{"image": img} for img in images]
    on_device = images.to(device)

    def monai_pass() -> None:
        for s in samples:
            monai_aug(dict(s))

    def ours_pass() -> None:
        out = augment(on_device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.sum().item()

    times = {"monai": [], "ours": []}
    ours_pass(), monai_pass()  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("monai", monai_pass), ("ours", ours_pass)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rate = {k: args.images / statistics.median(v) for k, v in times.items()}
    ratio = rate["ours"] / rate["monai"]
    print(f"{machine()}; {args.images} images per pass, {args.repeats} passes (median)")
    print(f"MONAI per-sample RandRotated/RandFlipd/RandZoomd (1 process): {rate['monai']:10.0f} images/s")
    print(f"mednist-gan batched augment on {device.type:4s}                   : {rate['ours']:10.0f} images/s")
    return verdict("ratio", ratio, TARGET)


if __name__ == "__main__":
    raise SystemExit(main())
