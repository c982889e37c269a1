"""One GPU's step at smaller per-device batches, the all-reduce volume, and a projection for 8 GPUs.

Splitting the bundle's global batch of 600 over 8 GPUs leaves each a per-device batch of 75, so what
8 GPUs can do is bounded by one GPU's step at batch 75. This script times ``Trainer.train_step`` (index
batch -> augmentation -> D phase -> G update -> EMA) in one process for per-device batches 600, 300,
150 and 75, eagerly and with CUDA graphs, fp32 and bf16; counts the bytes DDP all-reduces per iteration
(every gradient of D after each of its updates, of G after each generator update, in fp32); and
projects the 8-GPU iteration time as the batch-75 step plus the all-reduces over an assumed ring:
``latency + 2 * (n - 1) / n * bytes / bus_bandwidth`` each. Also the recipes of ``configs/`` at their
own batch, with their share of the GPU's measured peak rate.

    python benchmarks/bench_scaling.py [--data ../shared/data/mednist] [--iters 30]

CUDA graphs are not used under DDP yet (``runtime.graph_capture``): a multi-process job runs its
phases eagerly, and the projection gives both.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import flop_counter, machine  # noqa: E402


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _step(trainer, indices) -> None:
    """One iteration as ``fit`` runs it, on a fixed index batch."""
    trainer.gan_step.run(trainer.gan_step.prepare_reals(indices), step=trainer.state.step)
    trainer.state.step += 1


def time_steps(config: str, overrides: list[str], data: Path, iters: int, warmup: int = 6) -> dict:
    """Seconds per iteration (``iters`` timed after ``warmup``), FLOPs of one iteration, and parameter counts."""
    import torch

    from mednist_gan.config import load_config
    from mednist_gan.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / config, [
            f"data.root={data}", f"run_dir={tmp}", "log.sample_every=null",
            "export.at_end=false", "eval.every_steps=null", "eval.every_epochs=null", *overrides])
        trainer = Trainer(cfg)
        step = trainer.gan_step
        indices = next(iter(trainer.loader))

        # FLOPs of as many eager iterations as lazy R1 takes to repeat
        # (graphs off: replays are invisible to the counter).
        window = cfg.train.r1_every if cfg.train.r1_gamma > 0 else 1
        step.graphs.enabled, captured = False, step.graphs.enabled
        forwards = step.g_forward, step.d_forward  # and the plain networks (compiled code hides its FLOPs too)
        step.g_forward, step.d_forward = trainer.G, trainer.D
        with flop_counter() as counter:
            for _ in range(window):
                _step(trainer, indices)
        step.graphs.enabled = captured
        step.g_forward, step.d_forward = forwards
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        for _ in range(warmup):
            _step(trainer, indices)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            _step(trainer, indices)
        sync()
        seconds = (time.perf_counter() - start) / iters
        G, D = trainer.acc.unwrap_model(trainer.G), trainer.acc.unwrap_model(trainer.D)
        result = {"s_per_iter": seconds, "flops": counter.get_total_flops() / window,
                  "captured": bool(step.graphs.graphs), "g_params": sum(p.numel() for p in G.parameters()),
                  "d_params": sum(p.numel() for p in D.parameters()),
                  "d_train_steps": cfg.train.d_train_steps, "g_train_steps": cfg.train.g_train_steps,
                  "batch": cfg.train.batch_size}
        del trainer
    _reset_accelerate()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def try_time_steps(*args) -> dict | None:
    """``time_steps``, or None (said on one line) when that setting fails: the other rows still get measured."""
    try:
        return time_steps(*args)
    except Exception as exc:  # a benchmark run on a rented GPU should report what it can
        print(f"  {args[0]} {' '.join(args[1])}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        _reset_accelerate()
        return None


def matmul_peak_tflops(dtype: str) -> float:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=kind), torch.randn(n, n, device="cuda", dtype=kind)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per setting")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the projection")
    parser.add_argument("--bus-gbps", type=float, default=360.0,
                        help="assumed all-reduce bus bandwidth, GB/s (NCCL on 8 NVLink-4 GPUs: about 360-480)")
    parser.add_argument("--latency-us", type=float, default=25.0,
                        help="assumed latency of one small NCCL all-reduce, us")
    parser.add_argument("--batches", type=int, nargs="*", default=[600, 300, 150, 75],
                        help="per-device batches of the bundle recipe to time (none: only the recipes' rows)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_scaling.py measures a GPU's step; no CUDA GPU is visible here")
        return 1
    print(machine())
    peaks = {k: matmul_peak_tflops(k) for k in ("fp32", "tf32", "bf16")}
    print("measured matmul peak (8192^3): " + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in peaks.items()))
    rows = {}
    print(f"\nbundle recipe (configs/bundle.yaml, d_train_steps 5), one process, {args.iters} timed iterations:")
    print(f"{'per-device batch':>16} {'precision':>9} {'phases':>7} {'s/iter':>9} {'images/s':>10} {'TFLOP/s':>8}")
    for batch, precision, graphs in itertools.product(args.batches, ("no", "bf16"), ("true", "false")):
        r = try_time_steps("bundle.yaml", [f"train.batch_size={batch}", f"train.precision={precision}",
                                           f"runtime.cuda_graphs={graphs}"], args.data, args.iters)
        if r is None:
            continue
        rows[batch, precision, graphs] = r
        mode = "graphs" if r["captured"] else "eager"
        print(f"{batch:>16} {precision:>9} {mode:>7} {r['s_per_iter']:9.4f} {batch / r['s_per_iter']:10.0f} "
              f"{r['flops'] / r['s_per_iter'] / 1e12:8.2f}")

    print("\nrecipes and model presets at their own batch, fp32 (TF32 convolutions, runtime.tf32) and bf16, CUDA "
          "graphs; the bundle also without channels_last (instance norm computes in NCHW: channels_last costs a copy "
          "around every normalisation) and with runtime.compile (inductor fuses the small kernels; with and without "
          "graphs):")
    presets = ("bundle.yaml", "quality.yaml", "wide.yaml", "resnet.yaml", "conditional.yaml")
    variants = {"NCHW": ["runtime.channels_last=false"], "compile": ["runtime.compile=true"],
                "compile, eager": ["runtime.compile=true", "runtime.cuda_graphs=false"]}
    for config, precision, variant in (*itertools.product(presets, ("no", "bf16"), ("",)),
                                       *itertools.product(("bundle.yaml",), ("no", "bf16"), variants)):
        r = try_time_steps(config, [f"train.precision={precision}", *variants.get(variant, [])], args.data, args.iters)
        if r is None:
            continue
        peak = peaks["bf16" if precision == "bf16" else "tf32"]
        achieved = r["flops"] / r["s_per_iter"] / 1e12
        layout = f" {variant}" if variant else ""
        print(f"  {config:16s} {precision:>4}{layout}: batch {r['batch']:4d}, {r['s_per_iter'] * 1e3:7.2f} ms/iter, "
              f"{r['batch'] / r['s_per_iter']:9.0f} images/s, {r['flops'] / 1e9:6.1f} GFLOP/iter, "
              f"{achieved:6.2f} TFLOP/s = {100 * achieved / peak:4.1f}% of the "
              f"{'bf16' if precision == 'bf16' else 'tf32'} matmul peak; "
              f"G {r['g_params']:,} / D {r['d_params']:,} params")

    r = rows.get((600, "no", "true")) or rows.get((600, "no", "false"))
    if r is None:  # no batch rows asked for (the recipes only), or none ran
        return 1 if args.batches else 0
    reduces = r["d_train_steps"] + r["g_train_steps"]
    volume = 4 * (r["d_train_steps"] * r["d_params"] + r["g_train_steps"] * r["g_params"])
    n = args.gpus
    comm = r["d_train_steps"] * (args.latency_us * 1e-6 + 2 * (n - 1) / n * 4 * r["d_params"] / (args.bus_gbps * 1e9)) \
        + r["g_train_steps"] * (args.latency_us * 1e-6 + 2 * (n - 1) / n * 4 * r["g_params"] / (args.bus_gbps * 1e9))
    print(f"\nall-reduce per iteration (DDP, fp32 gradients): {reduces} all-reduces, {volume / 1e6:.2f} MB in all "
          f"(D {4 * r['d_params'] / 1e6:.2f} MB x {r['d_train_steps']}, "
          f"G {4 * r['g_params'] / 1e6:.2f} MB x {r['g_train_steps']}); "
          f"assumed {args.latency_us:g} us + {args.bus_gbps:g} GB/s bus bandwidth -> "
          f"{comm * 1e3:.2f} ms per iteration on {n} GPUs")
    per_device = 600 // n
    nearest = min(args.batches, key=lambda b: abs(b - per_device))
    for precision in ("no", "bf16"):
        if (600, precision, "true") not in rows:
            continue
        one = rows[600, precision, "true"]["s_per_iter"]
        for graphs in ("false", "true"):
            if (nearest, precision, graphs) not in rows or (600, precision, graphs) not in rows:
                continue
            t = rows[nearest, precision, graphs]["s_per_iter"] + comm
            print(f"projection, global batch 600 on {n} GPUs ({nearest} per device), {precision:>4}, phases "
                  f"{'as graphs' if graphs == 'true' else 'eager (what DDP runs today)'}: {t * 1e3:6.2f} ms/iter = "
                  f"{one / t:4.2f}x one GPU with graphs ({one * 1e3:.2f} ms); at 600 per device ({600 * n} global): "
                  f"{n * one / (rows[600, precision, graphs]['s_per_iter'] + comm):4.2f}x its images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
