"""Training compute of a recipe against the seed bundle's, counted and timed side by side.

For each config: the FLOPs of its iterations (forward and backward of every D and G update, R1's
double backward included; counted with ``torch.utils.flop_counter`` over ``r1_every`` consecutive
iterations so lazy R1 is averaged in) times its number of iterations on the 10,000 Hand images, and
the measured seconds per iteration on this machine (median of ``--iters`` after one warm-up), times
the same number of iterations. In-training evaluation is not training compute and is left out.

    python benchmarks/recipe_budget.py [--config configs/quality.yaml] [--data ../shared/data/mednist] [--max-ratio 1]

Prints both budgets and the ratios; exit 1 when the recipe needs more than ``--max-ratio`` times the bundle's FLOPs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import flop_counter, machine, verdict  # noqa: E402

HAND_IMAGES = 10_000


def measure(config: Path, data: Path, iters: int) -> dict:
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from mednist_gan.config import load_config
    from mednist_gan.training.trainer import Trainer

    cfg = load_config(config)
    iterations = math.ceil(HAND_IMAGES / cfg.train.batch_size) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        iterations = min(iterations, cfg.train.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        small = load_config(config, [f"run_dir={tmp}", f"data.root={data}", f"data.limit={cfg.train.batch_size}",
                                     "log.tracker=none", "eval.every_steps=null", "eval.every_epochs=null"])
        trainer = Trainer(small)
        real = trainer.gan_step.prepare_reals(next(iter(trainer.loader)))
        trainer.gan_step.run(real, step=trainer.state.step)  # warm-up
        window = max(1, cfg.train.r1_every if cfg.train.r1_gamma > 0 else 1)
        with flop_counter() as counter:
            for _ in range(window):
                trainer.gan_step.run(real, step=trainer.state.step)
                trainer.state.step += 1
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            trainer.gan_step.run(real, step=trainer.state.step)
            trainer.state.step += 1
            times.append(time.perf_counter() - start)
        trainer.tracking.finish()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    flops = counter.get_total_flops() / window
    s_per_iter = statistics.median(times)
    return {"iterations": iterations, "flops_per_iter": flops, "flops": flops * iterations,
            "s_per_iter": s_per_iter, "seconds": s_per_iter * iterations, "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "quality.yaml")
    parser.add_argument("--baseline", type=Path, default=REPO / "configs" / "bundle.yaml")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--max-ratio", type=float, default=1.0,
                        help="target: the recipe's FLOPs at most this many times the baseline's "
                             "(1 for configs/quality.yaml, 40 for the larger model presets)")
    args = parser.parse_args()
    print(machine())
    sides = {"bundle": measure(args.baseline, args.data, args.iters),
             "recipe": measure(args.config, args.data, args.iters)}
    for name, r in sides.items():
        print(f"{name:7} {r['iterations']:6d} iterations x {r['flops_per_iter'] / 1e9:8.2f} GFLOP "
              f"= {r['flops'] / 1e12:8.2f} TFLOP; "
              f"{r['s_per_iter']:.3f} s/iteration here -> {r['seconds'] / 3600:.2f} h")
    flop_ratio = sides["recipe"]["flops"] / sides["bundle"]["flops"]
    time_ratio = sides["recipe"]["seconds"] / sides["bundle"]["seconds"]
    print(f"wall-time ratio recipe/bundle on this machine: {time_ratio:.3f}")
    return verdict("training FLOPs ratio recipe/bundle", flop_ratio, args.max_ratio, at_least=False)


if __name__ == "__main__":
    raise SystemExit(main())
