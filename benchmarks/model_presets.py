"""Parameters and FLOPs per image of each config's networks (the model-size presets of docs/models.md).

    python benchmarks/model_presets.py [configs/bundle.yaml configs/wide.yaml configs/resnet.yaml ...]

FLOPs are counted with ``torch.utils.flop_counter`` on a forward pass of a batch of 8 (multiply-add = 2 FLOPs);
one training iteration costs several such passes per image (see benchmarks/recipe_budget.py for whole recipes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import flop_counter  # noqa: E402
from mednist_gan.config import load_config  # noqa: E402
from mednist_gan.models.networks import build_discriminator, build_generator  # noqa: E402

DEFAULT = ("bundle.yaml", "quality.yaml", "wide.yaml", "resnet.yaml", "conditional.yaml", "resnet128.yaml",
           "resnet256.yaml")


def describe(config: Path) -> str:
    cfg = load_config(config).model
    G, D = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    z = torch.randn(8, cfg.latent_size)
    with torch.no_grad():
        with flop_counter() as g_count:
            images = G(z)
        with flop_counter() as d_count:
            D(images)
    params = [sum(p.numel() for p in net.parameters()) for net in (G, D)]
    return (f"| `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}` | {cfg.arch} | {params[0]:,} | "
            f"{params[1]:,} | {g_count.get_total_flops() / 8 / 1e9:.3f} | {d_count.get_total_flops() / 8 / 1e9:.3f} |")


def main() -> int:
    configs = [Path(a) for a in sys.argv[1:]] or [REPO / "configs" / name for name in DEFAULT]
    print("| config | model.arch | G parameters | D parameters | G GFLOP/image | D GFLOP/image |")
    print("| --- | --- | --- | --- | --- | --- |")
    for config in configs:
        print(describe(config.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
