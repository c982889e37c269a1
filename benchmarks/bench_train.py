"""Training throughput and peak memory: the seed bundle's MONAI pipeline vs mednist-gan, one run.

Reference (the bundle's train.json rebuilt from MONAI's parts): ``CacheDataset`` of LoadImaged /
EnsureChannelFirstd / ScaleIntensityd, then per-sample RandRotated / RandFlipd / RandZoomd in
DataLoader workers, ``monai.engines.GanTrainer`` with d_train_steps=5, D ending in a Sigmoid and
the bundle's BCELoss functions. Ours: ``mednist_gan.training.trainer.Trainer`` with ``configs/bundle.yaml``
(fp32). Same images (the Hand folder), batch 600, same iteration semantics. Each side runs in its
own subprocess (so peak resident memory is its own), one after the other, ``--iters`` timed
iterations after one warm-up; the median iteration time gives images/s and the epoch time
(17 iterations for 10,000 images). FLOPs of one iteration are counted once with
``torch.utils.flop_counter`` and compared with a measured fp32 matmul peak of this machine.
For information, the reference runs a second time with our host-memory setting
(``mednist_gan.runtime.host_memory``, ``runtime.keep_host_memory``), to show how much of the ratio is the allocator.

    python benchmarks/bench_train.py [--iters 3] [--data ../shared/data/mednist] [--workers 2]

Prints both sides, the ratio, and PASS/FAIL against the target (exit 1 on FAIL): 2x on CPU, 6x on one GPU,
where our side also runs in bf16 and with its phases eager (CUDA graphs off) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import flop_counter, verdict  # noqa: E402

TARGET, GPU_TARGET = 2.0, 6.0  # issue #7 on CPU; issue #18 on one GPU
BATCH = 600


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_reference(data: Path, iters: int, workers: int, keep_host_memory: bool = False) -> dict:
    from functools import partial

    import numpy as np
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.engines import GanTrainer
    from monai.networks import normal_init
    from monai.networks.nets import Discriminator, Generator
    from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandFlipd, RandRotated,
                                  RandZoomd, ScaleIntensityd)
    from ignite.engine import Events

    if keep_host_memory:  # the allocator setting our side uses (runtime.keep_host_memory), for comparison
        from mednist_gan.runtime.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    files = sorted(str(p) for p in (data / "Hand").glob("*.jpeg"))
    transforms = Compose([
        LoadImaged(keys="image"), EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        ScaleIntensityd(keys="image"),
        RandRotated(keys="image", range_x=np.pi / 12, prob=0.5, keep_size=True),
        RandFlipd(keys="image", spatial_axis=0, prob=0.5),
        RandZoomd(keys="image", min_zoom=0.9, max_zoom=1.1, prob=0.5),
        EnsureTyped(keys="image"),
    ])
    dataset = CacheDataset([{"image": f} for f in files], transforms, progress=False)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    G = Generator(latent_shape=64, start_shape=[64, 8, 8], channels=[32, 16, 8, 1], strides=[2, 2, 2, 1])
    D = Discriminator(in_shape=[1, 64, 64], channels=[8, 16, 32, 64, 1], strides=[2, 2, 2, 2, 1], num_res_units=1,
                      kernel_size=5)
    G, D = G.apply(normal_init).to(device), D.apply(normal_init).to(device)
    G.conv.add_module("activation", torch.nn.Sigmoid())
    bce = torch.nn.BCELoss()

    def d_loss(gen, real, disc_net):
        r = bce(disc_net(real), real.new_full((real.shape[0], 1), 1))
        g = bce(disc_net(gen.detach()), gen.new_full((gen.shape[0], 1), 0))
        return (g + r) / 2

    def g_loss(gen, disc_net):
        out = disc_net(gen)
        return bce(out, out.new_full(out.shape, 1))

    trainer = GanTrainer(
        device=device, max_epochs=1, epoch_length=iters + 1, train_data_loader=loader,
        g_network=G, g_optimizer=torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
        g_loss_function=partial(g_loss, disc_net=D), d_network=D,
        d_optimizer=torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999)),
        d_loss_function=partial(d_loss, disc_net=D),
        d_prepare_batch=lambda b, device=None, non_blocking=False: b["image"].to(device), d_train_steps=5,
        g_update_latents=True, latent_shape=64)
    stamps = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: stamps.append(time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())
    trainer.run()
    # Iteration i spans from the end of iteration i-1 (data loading included) to its own end.
    ends = stamps[2::2]
    times = [b - a for a, b in zip(ends[:-1], ends[1:])]
    return {"iter_s": times, "peak_rss_mib": _peak_rss_mib()}


def run_ours(data: Path, iters: int, processes: int, overrides: list[str], window: int = 1) -> dict:
    """Train through the real entry point (and launcher), timing iterations from metrics.jsonl: one time per log
    window of ``window`` iterations (each log line waits for the device, so a GPU needs windows of many)."""
    cores = os.cpu_count() or 2
    threads = max(cores // processes, 1)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--config", str(REPO / "configs" / "bundle.yaml"), f"run_dir={tmp}", f"data.root={data}",
                f"train.max_steps={(iters + 1) * window}", f"log.every_steps={window}", "export.at_end=false",
                "checkpoint.every_epochs=null", "log.sample_every=null", f"runtime.num_threads={threads}", *overrides]
        if processes == 1:
            cmd = [sys.executable, "-m", "mednist_gan.train", *args]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0", "-m", "mednist_gan.train", *args]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore"))
        if result.returncode != 0:
            raise SystemExit(f"our side failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    times = [BATCH / r["images_per_s"] for r in rows[1:]]  # the first window is the warm-up (and graph capture)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"iter_s": times, "peak_rss_mib": peak}


def count_flops(data: Path) -> float:
    """FLOPs of one full iteration (5 D updates + 1 G update, forward and backward) at batch 600."""
    from mednist_gan.config import load_config
    from mednist_gan.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "bundle.yaml", [f"data.root={data}", f"run_dir={tmp}", "data.limit=600"])
        trainer = Trainer(cfg)
        real = trainer.gan_step.prepare_reals(next(iter(trainer.loader)))
        with flop_counter() as counter:
            trainer.gan_step.run(real, step=trainer.state.step)
    return counter.get_total_flops()


def matmul_peak_gflops() -> float:
    """fp32 matmul rate of the training device (TF32 off: the reference for fp32 work)."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - start) / 1e9


def _side(args) -> int:
    if args.side in ("reference", "reference-kept-memory"):
        result = run_reference(args.data, args.iters, args.workers, keep_host_memory=args.side != "reference")
    elif args.side == "flops":
        result = {"flops_per_iter": count_flops(args.data)}
    else:
        result = run_ours(args.data, args.iters, args.processes, args.override, args.window)
    print("RESULT " + json.dumps(result))
    return 0


def _spawn(side: str, args, processes: int = 1, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--iters", str(args.iters), "--data", str(args.data),
           "--workers", str(args.workers), "--processes", str(processes), "--window", str(args.window)]
    cmd += [f"--override={o}" for o in [*args.override, *extra]]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{side} side failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per side (after 1 warm-up)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--override", action="append", default=[], help="config override for our side")
    parser.add_argument("--processes", type=int, default=None,
                        help="our side's process counts to run; default: 1, and one per core on a CPU-only machine")
    parser.add_argument("--no-tuned-reference", action="store_true",
                        help="skip the extra reference run with our host-memory setting (information only)")
    parser.add_argument("--window", type=int, default=None,
                        help="our side's iterations per timed window (one log line each); "
                             "default 1 on CPU, 20 on a GPU")
    parser.add_argument("--side", choices=("reference", "reference-kept-memory", "ours", "flops"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.window is None:
        args.window = 20 if torch.cuda.is_available() else 1
    if args.side:
        return _side(args)

    cores = os.cpu_count() or 2
    counts = [args.processes] if args.processes else ([1] if torch.cuda.is_available() else [1, cores])
    ref = _spawn("reference", args)
    ref_kept = None if args.no_tuned_reference else _spawn("reference-kept-memory", args)
    ours = {f"mednist-gan, {n} process(es)": _spawn("ours", args, n) for n in counts}
    if torch.cuda.is_available():  # the bf16 row, and the eager phases for comparison (information only)
        ours["mednist-gan, bf16"] = _spawn("ours", args, 1, ("train.precision=bf16",))
        ours["mednist-gan, phases eager"] = _spawn("ours", args, 1, ("runtime.cuda_graphs=false",))
    flops = _spawn("flops", args)["flops_per_iter"]
    med_ref = statistics.median(ref["iter_s"])
    epoch_iters = math.ceil(10000 / BATCH)
    peak = matmul_peak_gflops()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {cores} cores"
    print(f"machine: {device}, torch {torch.__version__}; batch {BATCH}, d_train_steps 5, fp32; "
          f"{args.iters} timed iterations per side after 1 warm-up (median)")
    rows = [("MONAI GanTrainer (bundle)", ref, med_ref)]
    if ref_kept:
        rows.append(("  same, keep_freed_host_memory", ref_kept, statistics.median(ref_kept["iter_s"])))
    rows += [(name, r, statistics.median(r["iter_s"])) for name, r in ours.items()]
    for name, r, med in rows:
        print(f"{name:28s}: {med:7.2f} s/iter  {BATCH / med:8.1f} images/s  epoch ~{med * epoch_iters:7.1f} s  "
              f"peak RSS/process {r['peak_rss_mib']:6.0f} MiB  (iters: {', '.join(f'{t:.2f}' for t in r['iter_s'])})")
    fp32 = {name: r for name, r in ours.items() if "process(es)" in name}  # the target's rows: the bundle's fp32
    best_name, best = min(((name, statistics.median(r["iter_s"])) for name, r in fp32.items()), key=lambda x: x[1])
    achieved = flops / best / 1e9
    print(f"FLOPs per iteration: {flops / 1e9:.1f} GFLOP; achieved {achieved:.1f} GFLOP/s ({best_name}) "
          f"vs fp32 matmul peak {peak:.1f} GFLOP/s ({100 * achieved / peak:.0f}% of peak)")
    for name, r in ours.items():
        print(f"ratio (images/s, {name} / MONAI): {med_ref / statistics.median(r['iter_s']):.2f}x")
    if ref_kept:  # the target is against the bundle's pipeline as it runs; this line says how much is the allocator
        print(f"information: best of ours / MONAI with the same host-memory setting: "
              f"{statistics.median(ref_kept['iter_s']) / best:.2f}x")
    return verdict("best ratio", med_ref / best, GPU_TARGET if torch.cuda.is_available() else TARGET)


if __name__ == "__main__":
    raise SystemExit(main())
