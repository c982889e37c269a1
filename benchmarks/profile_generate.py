"""Where ``mednist-gan generate``'s time goes, stage by stage (for the GPU rows of docs/benchmarks.md).

Times, for N images of the seed weights: loading the model, the forward passes with the uint8 conversion
and the copy to the host, PNG encoding alone, file writes alone (threads), and encoding plus writing with
writer threads and with forked writer processes (`generate` uses threads; processes are the candidate
where the GIL caps the threads), each pool's start-up apart.

    python benchmarks/profile_generate.py [--num-samples 2000] \\
        [--weights ../shared/upstream/mednist_gan_bundle_model.pt]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import SEED_WEIGHTS, machine  # noqa: E402
from mednist_gan.generator.generate import _save_pngs, make_latents  # noqa: E402
from mednist_gan.generator.loader import open_generator  # noqa: E402
from mednist_gan.images import encode_png, to_uint8_pictures  # noqa: E402


def _write_all(pool, pictures, paths, writers):
    chunk = max(1, len(pictures) // writers)
    for f in [pool.submit(_save_pngs, pictures[i:i + chunk], paths[i:i + chunk])
              for i in range(0, len(pictures), chunk)]:
        f.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--weights", type=Path, default=SEED_WEIGHTS)
    args = parser.parse_args()
    n, writers = args.num_samples, max(2, os.cpu_count() or 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stamp = time.perf_counter
    print(machine(), f"| {n} images, {writers} writers")
    t = stamp()
    opened = open_generator(args.weights)
    net, size = opened.network.to(device), opened.latent_size
    sync()
    print(f"load model to {device}          : {stamp() - t:7.3f} s")
    latents = make_latents(n, size, 0, "uniform")
    for label in ("first forward (cold)", "forward + uint8 + to host"):
        t = stamp()
        with torch.inference_mode():
            pictures = [to_uint8_pictures(net(latents[i:i + 256].to(device))) for i in range(0, n, 256)]
        print(f"{label:30s}: {stamp() - t:7.3f} s")
    import numpy as np

    pictures = np.concatenate(pictures)
    t = stamp()
    encoded = [encode_png(p) for p in pictures]
    print(f"encode only, one thread        : {stamp() - t:7.3f} s ({1e6 * (stamp() - t) / n:.0f} us/image)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"w{i:05d}.png" for i in range(n)]
        with ThreadPoolExecutor(writers) as pool:
            t = stamp()
            list(pool.map(lambda a: a[0].write_bytes(a[1]), zip(paths, encoded)))
            print(f"write only, {writers} threads        : {stamp() - t:7.3f} s")
        for kind, pool in (("threads", ThreadPoolExecutor(writers)),
                           ("processes (fork)",
                            ProcessPoolExecutor(writers, mp_context=multiprocessing.get_context("fork")))):
            with pool:
                t = stamp()
                pool.submit(len, "warm").result()  # a fork pool starts all its workers at the first task
                print(f"start the {kind:16s} pool  : {stamp() - t:7.3f} s")
                t = stamp()
                _write_all(pool, pictures, [Path(tmp) / f"{kind[0]}{i:05d}.png" for i in range(n)], writers)
                print(f"encode + write, {kind:16s}: {stamp() - t:7.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
