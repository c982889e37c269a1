"""The sample grids: the shipped generators (the residual Hand generator, the default, and the bundle-architecture
one of configs/quality.yaml), the seed bundle's weights, real Hand images and the same real images
blurred with sigma 1.5 (what the metrics' sanity table compares the generators with, docs/quality.md); and the
shipped six-class generator beside real images, a row of 8 per class named on its left (as
`generate --class all` draws it).

    python docs/make_figures.py [--data ../shared/data/mednist] \\
        [--seed-weights ../shared/upstream/mednist_gan_bundle_model.pt]

Each grid holds 64 images: generated ones from latents of seed 0 (the shipped models and the seed's
weights each with the latent distribution that scores best for it), real ones drawn with seed 0. The class
grids hold 8 per class, the same 8 latents in every generated row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mednist_gan.generator.generate import SHIPPED_CONDITIONAL, SHIPPED_MODEL, make_latents
from mednist_gan.generator.loader import open_generator
from mednist_gan.images import image_grid, save_png, to_uint8_pictures
from mednist_gan.quality.evaluate import load_real_images
from mednist_gan.quality.scores import blurred

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def grid_of(model: Path, latent: str, out: Path) -> None:
    opened = open_generator(model)
    net, size = opened.network, opened.latent_size
    with torch.inference_mode():
        save_png(image_grid(to_uint8_pictures(net(make_latents(64, size, 0, latent))), columns=8), out)


def class_grids(model: Path, data: Path, generated: Path, real: Path) -> None:
    opened = open_generator(model)
    net, size = opened.network, opened.latent_size
    z = make_latents(8, size, 0, "normal")
    rows, real_rows = [], []
    for label, name in enumerate(opened.classes):
        with torch.inference_mode():
            rows.append(net(z, torch.full((8,), label, dtype=torch.long)))
        images = load_real_images(data / name)
        real_rows.append(images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:8]])
    save_png(image_grid(to_uint8_pictures(torch.cat(rows)), columns=8, labels=opened.classes), generated)
    save_png(image_grid(to_uint8_pictures(torch.cat(real_rows)), columns=8, labels=opened.classes), real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--seed-weights", type=Path,
                        default=REPO.parent / "shared" / "upstream" / "mednist_gan_bundle_model.pt")
    args = parser.parse_args()
    out = HERE / "images"
    out.mkdir(exist_ok=True)
    grid_of(SHIPPED_MODEL, "normal", out / "hand_grid.png")
    grid_of(SHIPPED_MODEL.parents[1] / "generator" / "mednist_gan.ts", "normal", out / "quality_grid.png")
    grid_of(args.seed_weights, "normal", out / "seed_grid.png")
    real = load_real_images(args.data / "Hand")
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:64]
    save_png(image_grid(to_uint8_pictures(real[pick]), columns=8), out / "real_grid.png")
    save_png(image_grid(to_uint8_pictures(blurred(real[pick], 1.5)), columns=8), out / "real_blurred_grid.png")
    class_grids(SHIPPED_CONDITIONAL, args.data, out / "conditional_grid.png", out / "real_classes_grid.png")
    print(f"wrote {out}/hand_grid.png, quality_grid.png, seed_grid.png, real_grid.png, real_blurred_grid.png, "
          "conditional_grid.png, real_classes_grid.png")


if __name__ == "__main__":
    main()
