"""Issue #17's quality targets, measured: one line per target, PASS or FAIL, exit 1 when one fails.

A Hand generator is scored by ``mednist-gan evaluate``'s code against real Hand images, beside the seed bundle's
weights (both latent distributions: its best counts) and the real images blurred with sigma 1.5 (the yardstick):

- FD-SSL (the self-supervised encoder's space, the one that agrees with the eye) no worse than the blurred hands';
- FMD (the classifier's space) at most 0.25x the seed weights';
- MS-SSIM diversity within 10% of the real images'.

A six-class conditional generator (``--conditional``) is scored on each class against that class's real images
(``--data`` then holds the six class folders; N defaults to evaluate's min(5000, half the class): BreastMRI's 8,954
images allow 4,477), and as a whole by train-on-synthetic, test-on-real:

- per class: class accuracy >= 98%; MS-SSIM diversity within 10% of the class's real images'; FD-SSL at most 1.5x
  that of the class's real images blurred with sigma 1.5; memorization share (pixels and encoder features) at most
  2x the real held-out images' share;
- a classifier trained on its images only scores >= 95% on real held-out images.

``--one-class-bar`` holds a conditional generator to issue #38's bar instead, as good as a one-class generator:
FD-SSL at most 1.0x the blurred images' in every class, and on Hand at most 1.5x the FD-SSL of the one-class
generator given by ``--one-class`` (default the shipped Hand generator, scored in the same run on the same real
images), whose diversity must be within 10% of the real images' too.

    python benchmarks/quality_targets.py --model mednist_gan/assets/hand/model.pt [--num-samples 5000] [--out t.json]
    python benchmarks/quality_targets.py --conditional --model mednist_gan/assets/conditional/model.pt [--out t.json]
        [--one-class-bar [--one-class mednist_gan/assets/hand/model.pt]]
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
CLASS_ACCURACY = 0.98
FD_VS_BLURRED = 1.5  # conditional: per class, at most this times the blurred real images' FD-SSL
ONE_CLASS_FD_VS_BLURRED, HAND_VS_ONE_CLASS = 1.0, 1.5  # issue #38's bar (--one-class-bar)
ONE_CLASS = REPO / "mednist_gan" / "assets" / "hand" / "model.pt"
MEMORIZATION_VS_REAL = 2.0
TSTR_ACCURACY = 0.95
USEFULNESS_PER_CLASS = 1000


def hand_targets(result: dict) -> list[tuple[str, float, float, bool]]:
    """(target, measured, limit, met) from an ``evaluate`` result holding one model, the seed as a baseline
    and the ``BLUR_SIGMA`` row."""
    rows = result["rows"]
    blur = _blurred_row(rows)
    seed = [r for r in rows if r["name"].startswith("baseline ")]
    model = next(r for r in rows[1:] if r["latent"] == "normal" and not r["name"].startswith("baseline "))
    seed_fmd = min(r["fmd"] for r in seed)
    real = result["real_diversity"]
    return [
        (f"FD-SSL no worse than real hands blurred with sigma {BLUR_SIGMA:g}", model["fd_ssl"], blur["fd_ssl"],
         model["fd_ssl"] <= blur["fd_ssl"]),
        (f"FMD at most {FMD_VS_SEED:g}x the seed weights' ({seed_fmd:.3f})", model["fmd"], FMD_VS_SEED * seed_fmd,
         model["fmd"] <= FMD_VS_SEED * seed_fmd),
        _diversity_target("MS-SSIM diversity", model["diversity"], real),
    ]


def _diversity_target(what: str, diversity: float, real: float) -> tuple[str, float, float, bool]:
    """``what`` within ``DIVERSITY_TOLERANCE`` of the real images' MS-SSIM ``real``, as a (target, measured, limit,
    met) row."""
    return (f"{what} within {DIVERSITY_TOLERANCE:.0%} of the real images' ({real:.4f})", diversity,
            (1 + DIVERSITY_TOLERANCE) * real, abs(diversity / real - 1) <= DIVERSITY_TOLERANCE)


def _blurred_row(rows: list[dict]) -> dict:
    return next(r for r in rows if r["name"] == f"real blurred, sigma {BLUR_SIGMA:g}")


def conditional_targets(result: dict, fd_vs_blurred: float = FD_VS_BLURRED) -> list[tuple[str, float, float, bool]]:
    """(target, measured, limit, met) from an ``evaluate`` result of one conditional model on every class, with
    the ``BLUR_SIGMA`` rows and usefulness; FD-SSL at most ``fd_vs_blurred`` times the blurred images'."""
    targets = []
    for block in result["classes"]:
        name, rows = block["class"], block["rows"]
        floor, blur = rows[0], _blurred_row(rows)
        model = next(r for r in rows if r["model"] is not None)
        real = block["real_diversity"]
        targets += [
            (f"{name}: class accuracy at least {CLASS_ACCURACY:.0%}", model["class_accuracy"], CLASS_ACCURACY,
             model["class_accuracy"] >= CLASS_ACCURACY),
            _diversity_target(f"{name}: MS-SSIM diversity", model["diversity"], real),
            (f"{name}: FD-SSL at most {fd_vs_blurred:g}x real images blurred with sigma {BLUR_SIGMA:g} "
             f"({blur['fd_ssl']:.3f})", model["fd_ssl"], fd_vs_blurred * blur["fd_ssl"],
             model["fd_ssl"] <= fd_vs_blurred * blur["fd_ssl"]),
        ]
        for space in ("pixels", "encoder"):
            share, held_out = model[f"memorization_{space}"], floor[f"memorization_{space}"]
            targets.append((f"{name}: memorization ({space}) at most {MEMORIZATION_VS_REAL:g}x the real held-out "
                            f"images' ({held_out:.2%})", share, MEMORIZATION_VS_REAL * held_out,
                            share <= MEMORIZATION_VS_REAL * held_out))
    (useful,) = result["usefulness"].values()
    accuracy = useful["synthetic_accuracy"]["all"]
    targets.append((f"train on synthetic, test on real: accuracy at least {TSTR_ACCURACY:.0%} (trained on real: "
                    f"{useful['real_accuracy']['all']:.4f})", accuracy, TSTR_ACCURACY, accuracy >= TSTR_ACCURACY))
    return targets


def one_class_targets(conditional: dict, one_class: dict,
                      class_name: str = "Hand") -> list[tuple[str, float, float, bool]]:
    """Issue #38's bar beside a one-class generator of ``class_name``: the conditional generator's FD-SSL on that
    class at most ``HAND_VS_ONE_CLASS`` times the one-class generator's (``one_class``: its ``evaluate`` result on
    the same real images), whose own diversity is within 10% of the real images'."""
    block = next(b for b in conditional["classes"] if b["class"] == class_name)
    six = next(r for r in block["rows"] if r["model"] is not None)
    own = next(r for r in one_class["rows"] if r["model"] is not None)
    real = one_class["real_diversity"]
    return [
        (f"{class_name}: FD-SSL at most {HAND_VS_ONE_CLASS:g}x the one-class generator's ({own['fd_ssl']:.3f})",
         six["fd_ssl"], HAND_VS_ONE_CLASS * own["fd_ssl"], six["fd_ssl"] <= HAND_VS_ONE_CLASS * own["fd_ssl"]),
        _diversity_target(f"{class_name}, one-class generator: MS-SSIM diversity", own["diversity"], real),
    ]


def score_conditional_generator(model: Path, mednist_root: Path, num_samples: int | None = None,
                                usefulness: int = USEFULNESS_PER_CLASS) -> dict:
    from mednist_gan.quality.evaluate import evaluate

    return evaluate([(str(model), model, ("normal",))], mednist_root, num_samples, classes=["all"],
                    usefulness=usefulness, blur=(BLUR_SIGMA,))


def score_hand_generator(model: Path, real_dir: Path, num_samples: int, seed_weights: Path = SEED_WEIGHTS) -> dict:
    from mednist_gan.quality.evaluate import evaluate

    return evaluate([(str(model), model, ("normal",)),
                     (f"baseline {seed_weights}", seed_weights, ("normal", "uniform"))],
                    real_dir, num_samples, blur=(BLUR_SIGMA,))


def main() -> int:
    from mednist_gan.quality.evaluate import evaluate, format_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the generator (any format evaluate takes)")
    parser.add_argument("--conditional", action="store_true",
                        help="a six-class conditional generator: the per-class targets and train-on-synthetic")
    parser.add_argument("--data", type=Path, default=None,
                        help="the MedNIST folder (default: ../shared/data/mednist for Hand, mednist-full with "
                             "--conditional, the images the generators trained on)")
    parser.add_argument("--seed-weights", type=Path, default=SEED_WEIGHTS)
    parser.add_argument("--num-samples", type=int, default=None,
                        help="images per class (default: 5000 for Hand; min(5000, half the class) per class)")
    parser.add_argument("--usefulness", type=int, default=USEFULNESS_PER_CLASS, metavar="PER_CLASS",
                        help="--conditional: generated images per class the train-on-synthetic classifier learns from")
    parser.add_argument("--one-class-bar", action="store_true",
                        help="--conditional: issue #38's bar (FD-SSL at most 1.0x blurred in every class; Hand at "
                             "most 1.5x the --one-class generator's)")
    parser.add_argument("--one-class", type=Path, default=ONE_CLASS,
                        help="the one-class Hand generator of --one-class-bar (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the evaluation and the targets as JSON")
    args = parser.parse_args()
    print(machine())
    data = args.data or REPO.parent / "shared" / "data" / ("mednist-full" if args.conditional else "mednist")
    if args.conditional:
        result = score_conditional_generator(args.model, data, args.num_samples, args.usefulness)
        targets = conditional_targets(result, ONE_CLASS_FD_VS_BLURRED if args.one_class_bar else FD_VS_BLURRED)
        if args.one_class_bar:
            hand = next(b for b in result["classes"] if b["class"] == "Hand")
            result["one_class"] = evaluate([(str(args.one_class), args.one_class, ("normal",))], data / "Hand",
                                           hand["num_samples"], blur=(BLUR_SIGMA,))
            print(format_table(result["one_class"]))
            targets += one_class_targets(result, result["one_class"])
    else:
        result = score_hand_generator(args.model, data / "Hand", args.num_samples or 5000, args.seed_weights)
        targets = hand_targets(result)
    print(format_table(result))
    for name, value, limit, met in targets:
        print(f"{'PASS' if met else 'FAIL'}  {name}: {value:.4f} (limit {limit:.4f})")
    if args.out:
        result["targets"] = [{"target": n, "value": v, "limit": lim, "met": m} for n, v, lim, m in targets]
        write_json(result, args.out)
    return 0 if all(met for *_, met in targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
