"""The bundle iteration on CPU in bf16 autocast against fp32, side by side in one process.

On CPUs with AMX-BF16 (Intel Sapphire Rapids and later; ``amx_bf16`` in /proc/cpuinfo) oneDNN runs bf16
convolutions on the matrix units; with AVX512-BF16 alone it has bf16 dot-product instructions; otherwise
bf16 is emulated. ``train.precision=bf16`` stays off in ``configs/bundle.yaml`` either way: it changes the
recipe's numerics. Each precision is timed twice, interleaved (fp32, bf16, fp32, bf16), to show the noise.

    python benchmarks/bench_cpu_precision.py [--data ../shared/data/mednist] [--iters 3] [--batch 600]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import machine  # noqa: E402
from bench_scaling import time_steps  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    names = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2") if f in flags]
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"{model}; {' '.join(names) or 'none of amx_bf16/avx512_bf16/avx512f/avx2'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--batch", type=int, default=600)
    args = parser.parse_args()
    print(machine(), "|", cpu_flags(), "|", os.cpu_count(), "cores")
    seconds = {"no": [], "bf16": []}
    for _ in range(2):
        for precision in seconds:
            r = time_steps("bundle.yaml", [f"train.precision={precision}", f"train.batch_size={args.batch}"],
                           args.data, args.iters, warmup=1)
            seconds[precision].append(r["s_per_iter"])
    for precision, values in seconds.items():
        print(f"bundle iteration, batch {args.batch}, precision {precision:>4}: "
              + ", ".join(f"{v:.2f}" for v in values) + " s/iter")
    ratio = min(seconds["no"]) / min(seconds["bf16"])
    print(f"bf16 / fp32 speed (best of each): {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
