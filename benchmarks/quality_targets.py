"""Issue #17's targets for a Hand generator, measured: one line per target, PASS or FAIL, exit 1 when one fails.

The generator is scored by ``mednist-gan evaluate``'s code against real Hand images, beside the seed bundle's
weights (both latent distributions: its best counts) and the real images blurred with sigma 1.5 (the yardstick):

- FD-SSL (the self-supervised encoder's space, the one that agrees with the eye) no worse than the blurred hands';
- FMD (the classifier's space) at most 0.25x the seed weights';
- MS-SSIM diversity within 10% of the real images'.

    python benchmarks/quality_targets.py --model mednist_gan/assets/hand/model.pt [--num-samples 5000] [--out t.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import SEED_WEIGHTS, machine  # noqa: E402

BLUR_SIGMA = 1.5
FMD_VS_SEED = 0.25
DIVERSITY_TOLERANCE = 0.10


def hand_targets(result: dict) -> list[tuple[str, float, float, bool]]:
    """(target, measured, limit, met) from an ``evaluate`` result holding one model, the seed as a baseline
    and the ``BLUR_SIGMA`` row."""
    rows = result["rows"]
    blur = next(r for r in rows if r["name"] == f"real blurred, sigma {BLUR_SIGMA:g}")
    seed = [r for r in rows if r["name"].startswith("baseline ")]
    model = next(r for r in rows[1:] if r["latent"] == "normal" and not r["name"].startswith("baseline "))
    seed_fmd = min(r["fmd"] for r in seed)
    real = result["real_diversity"]
    return [
        (f"FD-SSL no worse than real hands blurred with sigma {BLUR_SIGMA:g}", model["fd_ssl"], blur["fd_ssl"],
         model["fd_ssl"] <= blur["fd_ssl"]),
        (f"FMD at most {FMD_VS_SEED:g}x the seed weights' ({seed_fmd:.3f})", model["fmd"], FMD_VS_SEED * seed_fmd,
         model["fmd"] <= FMD_VS_SEED * seed_fmd),
        (f"MS-SSIM diversity within {DIVERSITY_TOLERANCE:.0%} of the real images' ({real:.4f})", model["diversity"],
         (1 + DIVERSITY_TOLERANCE) * real, abs(model["diversity"] / real - 1) <= DIVERSITY_TOLERANCE),
    ]


def score_hand_generator(model: Path, real_dir: Path, num_samples: int, seed_weights: Path = SEED_WEIGHTS) -> dict:
    from mednist_gan.quality import evaluate

    return evaluate([(str(model), model, ("normal",)), (f"baseline {seed_weights}", seed_weights, ("normal", "uniform"))],
                    real_dir, num_samples, blur=(BLUR_SIGMA,))


def main() -> int:
    from mednist_gan.quality import format_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the Hand generator (any format evaluate takes)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--seed-weights", type=Path, default=SEED_WEIGHTS)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="also write the evaluation and the targets as JSON")
    args = parser.parse_args()
    print(machine())
    result = score_hand_generator(args.model, args.data / "Hand", args.num_samples, args.seed_weights)
    print(format_table(result))
    targets = hand_targets(result)
    for name, value, limit, met in targets:
        print(f"{'PASS' if met else 'FAIL'}  {name}: {value:.4f} (limit {limit:.4f})")
    if args.out:
        result["targets"] = [{"target": n, "value": v, "limit": lim, "met": m} for n, v, lim, m in targets]
        write_json(result, args.out)
    return 0 if all(met for *_, met in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
