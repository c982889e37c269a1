"""What each CPU-only runtime setting gains end to end: the bundle's iteration with it on and off, one run.

Each variant trains ``configs/bundle.yaml`` (batch 600, 5 D updates + 1 G update, fp32, one process)
through the real entry point for ``--iters`` timed iterations after a warm-up (``bench_train.run_ours``);
variants alternate over ``--rounds`` so that drift of a shared machine hits all of them alike. A setting
that gains under 3% end to end does not earn its lines (issue #15) and is dropped.

    python benchmarks/bench_runtime.py [--iters 3] [--rounds 2] [--data ../shared/data/mednist]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import machine  # noqa: E402
from bench_train import run_ours  # noqa: E402

SETTINGS = {"runtime.cpu_mask_dropout": "faster dropout masks (rand >= p)",
            "runtime.keep_host_memory": "freed host memory kept in the process"}
THRESHOLD = 0.03


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    args = parser.parse_args()
    variants = {"all on (default)": [], **{f"{key}=false": [f"{key}=false"] for key in SETTINGS}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, overrides in variants.items():
            times[name] += run_ours(args.data, args.iters, 1, overrides)["iter_s"]
    print(machine())
    base = statistics.median(times["all on (default)"])
    print(f"all on (default): {base:.2f} s/iter (median of {len(times['all on (default)'])})")
    for key, what in SETTINGS.items():
        off = statistics.median(times[f"{key}=false"])
        gain = off / base - 1
        print(f"{key} ({what}): off {off:.2f} s/iter -> gains {gain:+.1%} end to end "
              f"{'(keep)' if gain >= THRESHOLD else '(under 3%: drop)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
