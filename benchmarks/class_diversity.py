"""Per-class MS-SSIM diversity of a class-conditional generator beside its classes' real images: a check in seconds
to follow a run's within-class collapse between evaluations (`quality_targets.py --conditional` scores every target).

    python benchmarks/class_diversity.py --model <run>/checkpoints/step_006000 [--data ../shared/data/mednist-full]

Lower MS-SSIM = more varied; issue #17 asks for each class within 10% of its real images'. A checkpoint folder is
read with its EMA weights, as evaluation and export read it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mednist_gan.generator.generate import make_latents, run_generator
from mednist_gan.generator.loader import open_generator
from mednist_gan.quality.evaluate import load_real_images
from mednist_gan.quality.scores import diversity

REPO = Path(__file__).resolve().parents[1]


def class_diversity(model: Path, data: Path, num_samples: int = 300, num_real: int = 2000,
                    pairs: int = 500, seed: int = 0) -> list[tuple[str, float, float]]:
    """(class, generated images' diversity, real images' diversity) for every class the generator makes."""
    opened = open_generator(model)
    classes, net, size = opened.classes, opened.network, opened.latent_size
    if not classes:
        raise SystemExit(f"--model {model}: not a class-conditional generator")
    rows = []
    for index, name in enumerate(classes):
        labels = torch.full((num_samples,), index, dtype=torch.long)
        images = run_generator(net, make_latents(num_samples, size, seed), model, labels=labels)
        real = load_real_images(data / name)
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:num_real]]
        rows.append((name, diversity(images, pairs, seed), diversity(real, pairs, seed)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder or exported generator")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist-full")
    parser.add_argument("--num-samples", type=int, default=300, help="generated images per class")
    parser.add_argument("--pairs", type=int, default=500, help="random pairs per MS-SSIM mean")
    args = parser.parse_args()
    for name, generated, real in class_diversity(args.model, args.data, args.num_samples, pairs=args.pairs):
        print(f"{name:10s} generated {generated:.3f}  real {real:.3f}  ({generated / real - 1:+.0%})")


if __name__ == "__main__":
    main()
