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
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import verdict  # noqa: E402

TARGET = 1.15


def _run(processes: int, args, run_dir: Path) -> list[float]:
    cores = os.cpu_count() or 2
    threads = max(cores // processes, 1)
    common = ["--config", str(REPO / "configs" / "bundle.yaml"), f"run_dir={run_dir}", f"data.root={args.data}",
              f"train.max_steps={args.steps}", "train.log_every=1", "export.at_end=false", "checkpoint.every_epochs=null",
              f"train.num_threads={threads}", "log.sample_every=null"]
    if processes == 1:
        cmd = [sys.executable, "-m", "mednist_gan.train", *common]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "mednist_gan.train", *common]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{processes}-process run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [600 / r["images_per_s"] for r in rows[1:]]  # drop the warm-up window


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(1, args, Path(tmp) / "one")
        two = _run(2, args, Path(tmp) / "two")
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
