"""Multi-process overhead: the same global batch with 1 process vs 2 processes (gloo on CPU, one run).

Both sides train ``configs/bundle.yaml`` (batch 600, fp32) for ``--steps`` iterations on the real Hand
images, started the way users start them (``python -m mednist_gan.train`` and ``accelerate launch
--multi_gpu --num_processes 2``). The 1-process side uses all cores as intra-op threads; each of the 2
processes gets cores / 2 threads. Per-iteration time is the median of the logged iteration windows
after the first (warm-up) one.

    python benchmarks/bench_ddp.py [--steps 4] [--data ../shared/data/mednist]

Prints s/iter for both, the ratio, and PASS/FAIL against the target (2 processes within 15% of 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import verdict  # noqa: E402
from bench_train import run_ours  # noqa: E402  (the same launch, threads and timing as the training benchmark)

TARGET = 1.15


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="iterations per side, the first one a warm-up")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    args = parser.parse_args()
    # run_ours times iterations after one warm-up: --steps iterations in all, as before.
    one = run_ours(args.data, args.steps - 1, 1, [])["iter_s"]
    two = run_ours(args.data, args.steps - 1, 2, [])["iter_s"]
    m1, m2 = statistics.median(one), statistics.median(two)
    ratio = m2 / m1
    print(f"machine: cpu, {os.cpu_count()} cores; configs/bundle.yaml, global batch 600, fp32, "
          f"{args.steps} iterations per side, median after the first")
    print(f"1 process  ({os.cpu_count()} threads): {m1:6.2f} s/iter  ({', '.join(f'{t:.2f}' for t in one)})")
    print(f"2 processes ({max((os.cpu_count() or 2) // 2, 1)} thread each, gloo): {m2:6.2f} s/iter  "
          f"({', '.join(f'{t:.2f}' for t in two)})")
    return verdict("ratio (2 processes / 1 process per-iteration time)", ratio, TARGET, at_least=False, unit="")


if __name__ == "__main__":
    raise SystemExit(main())
