"""Generation throughput: the seed bundle's inference pipeline vs ``mednist-gan generate``, same process.

Reference: the bundle's ``inference.json`` rebuilt from MONAI's parts (a Dataset of latents, a
DataLoader of batch 1, ``SupervisedEvaluator`` with ``Activationsd(sigmoid)`` + ``SaveImaged`` PNG
post-processing). Ours: ``mednist_gan.generator.generate.generate`` (batched forward, threaded PNG writes).
Both use the seed bundle's weights and write N PNGs; start-up (model load) is included in both.

    python benchmarks/bench_generate.py [--num-samples 1000] [--weights ../shared/upstream/mednist_gan_bundle_model.pt]

Prints PNGs/s for both, the ratio, and PASS/FAIL against the 20x target (exit 1 on FAIL).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _report import SEED_WEIGHTS, machine, verdict  # noqa: E402
from mednist_gan.generator.generate import generate  # noqa: E402

TARGET = 20.0


def monai_pipeline(weights: Path, n: int, out: Path) -> float:
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointLoader
    from monai.inferers import SimpleInferer
    from monai.networks.nets import Generator
    from monai.transforms import Activationsd, Compose, SaveImaged

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as the bundle's inference.json
    net = Generator(latent_shape=64, start_shape=[64, 8, 8], channels=[32, 16, 8, 1], strides=[2, 2, 2, 1]).to(device)
    data = Dataset([torch.rand(64) for _ in range(n)])
    post = Compose([Activationsd(keys="pred", sigmoid=True),
                    SaveImaged(keys="pred", output_dir=str(out), output_ext="png", separate_folder=False, scale=255,
                               output_dtype=np.uint8, meta_key_postfix=None, print_log=False)])
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=DataLoader(data, batch_size=1, shuffle=False, num_workers=0),
        network=net, inferer=SimpleInferer(), postprocessing=post,
        prepare_batch=lambda batchdata, *_, **__: (batchdata.to(device), None, (), {}),
        val_handlers=[CheckpointLoader(load_path=str(weights), load_dict={"model": net})])
    evaluator.run()
    elapsed = time.perf_counter() - start
    assert len(list(out.glob("*.png"))) == n, "the MONAI pipeline did not write every PNG"
    return elapsed


def ours(weights: Path, n: int, out: Path) -> float:
    start = time.perf_counter()
    generate(weights, n, out, seed=0, latent="uniform")  # on the GPU when there is one
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--weights", type=Path, default=SEED_WEIGHTS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side; the median is reported")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        times = {"monai": [], "ours": [], "ours_one": []}
        for r in range(args.repeats):  # interleaved, so both sides see the same machine state
            for name, fn, n in (("monai", monai_pipeline, args.num_samples), ("ours", ours, args.num_samples),
                                ("ours_one", ours, 1)):
                out = work / f"{name}{r}"
                times[name].append(fn(args.weights, n, out))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rate = {k: args.num_samples / med[k] for k in ("monai", "ours")}
    ratio = rate["ours"] / rate["monai"]
    print(machine())
    print(f"samples: {args.num_samples}, repeats: {args.repeats} (median)")
    print(f"MONAI bundle pipeline : {rate['monai']:8.1f} PNGs/s ({med['monai']:.2f} s)")
    print(f"mednist-gan generate  : {rate['ours']:8.1f} PNGs/s ({med['ours']:.2f} s)")
    # Where our time goes: a one-image run is the start-up (model load, first device calls, thread pool).
    steady = (args.num_samples - 1) / max(med["ours"] - med["ours_one"], 1e-9)
    print(f"  of which start-up (a 1-image run): {med['ours_one']:.2f} s; after it: {steady:.1f} PNGs/s")
    return verdict("ratio", ratio, TARGET)


if __name__ == "__main__":
    raise SystemExit(main())
