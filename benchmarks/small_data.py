"""Small data: how FD-SSL holds up with fewer training images, without and with augmenting what D sees, and what
starting from the shipped Hand generator gives a new class with few images.

Every run is configs/resnet.yaml at the same width, batch and number of iterations (the same compute), scored by
``mednist-gan evaluate``'s FD-SSL at N generated vs N of 2N held-out real images of its class (never trained on;
the other N make evaluate's real-vs-real floor):

- Hand with the full set (all but the 2N held-out images: 8,000 at N = 1000), 1,000 and 200 training images, each with
  ``train.d_augment`` none, diffaugment and ada;
- CXR with 500 training images from scratch, and fine-tuned from the shipped Hand generator (``train.init_from``,
  whose width the runs must then have: 16), both with ``--cxr-augment``.

``--repeat-full K`` trains the full-set run without augmentation K more times with the K seeds after the recipe's
own ``train.seed``: the spread of those runs is what a difference between rows must exceed to mean anything (a
run again with the same seed repeats its score to the last digit).

Targets (printed with PASS/FAIL): with 1,000 images, ADA or DiffAugment at most 1.3x the full set's FD-SSL (without
augmentation); fine-tuning beats scratch on 500 CXR images.

    python benchmarks/small_data.py --data ../shared/data/mednist-full --work /tmp/small_data [--iterations 2000]
        [--precision bf16] [--parallel 4] [--out small_data.json]     # --parallel: runs side by side (on one GPU)

A run that finished is reused when the script runs again with the same --work (its export is there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from _report import machine, verdict  # noqa: E402

MODES = ("none", "diffaugment", "ada")
SIZES = ("full", 1000, 200)
SHIPPED_HAND = REPO / "mednist_gan" / "assets" / "hand"
TARGET_VS_FULL = 1.3


def split(data: Path, name: str, held_out: int, work: Path, sizes) -> tuple[Path, dict]:
    """A held-out folder of ``held_out`` images of class ``name`` and a training folder per size (symlinks; the
    training images never include a held-out one); returns (held-out folder, {size: data.root})."""
    files = sorted(p for p in (data / name).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if len(files) <= held_out:
        sys.exit(f"{data / name}: {len(files)} images; needs more than the {held_out} held out")
    roots = {}
    evaluation = _link(files[-held_out:], work / f"{name}_held_out" / name)
    for size in sizes:
        count = len(files) - held_out if size == "full" else size
        roots[size] = _link(files[:count], work / f"{name}_{size}" / name).parent
    return evaluation, roots


def _link(files: list[Path], folder: Path) -> Path:
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
    return folder


def train_and_score(name: str, root: Path, evaluation: Path, args, overrides: list[str]) -> dict:
    """One run (reused when its export exists) and its FD-SSL against the held-out images."""
    run = args.work / "runs" / name
    common = [f"run_dir={run}", f"data.root={root}", f"data.classes=[{evaluation.name}]",
              f"model.resnet_g_channels={args.width}", f"model.resnet_d_channels={args.width}",
              f"train.batch_size={args.batch}", f"train.max_steps={args.iterations}", "train.epochs=100000",
              "eval.every_steps=null", "log.sample_every=null", f"checkpoint.every_steps={args.iterations}",
              f"train.ada_images={args.ada_images}", f"train.precision={args.precision}",
              f"data.cache_dir={args.work / 'cache'}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if not (run / "export" / "model.pt").is_file():
        done = subprocess.run([sys.executable, "-m", "mednist_gan", "train", "--config",
                               str(REPO / "configs" / "resnet.yaml"), *common, *overrides],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name}: training failed:\n{done.stderr[-3000:]}")
    out = args.work / "scores" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "mednist_gan", "evaluate", "--model", str(run / "export" / "model.pt"),
                           "--real-dir", str(evaluation), "--num-samples", str(args.num_samples), "--out", str(out)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: evaluation failed:\n{done.stderr[-3000:]}")
    (model_row,) = [row for row in json.loads(out.read_text())["rows"] if row["name"] != "real vs real (floor)"]
    return {"run": name, "fd_ssl": model_row["fd_ssl"], "fmd": model_row["fmd"], "diversity": model_row["diversity"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mednist-full",
                        help="MedNIST with its Hand and CXR folders")
    parser.add_argument("--work", type=Path, default=Path("/tmp/small_data"), help="runs, splits and scores")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--width", type=int, default=16, help="the residual networks' width (16: the shipped Hand "
                                                               "generator's, which the fine-tuning run starts from)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no",
                        help="train.precision (bf16 runs about 1.5x faster on a CPU with AMX)")
    parser.add_argument("--ada-images", type=int, default=20_000, help="train.ada_images (short runs move p faster)")
    parser.add_argument("--num-samples", type=int, default=1000, help="N generated vs N held-out real images")
    parser.add_argument("--cxr-augment", choices=MODES, default="ada")
    parser.add_argument("--repeat-full", type=int, default=0, metavar="K",
                        help="the full set without augmentation K more times, other seeds (run-to-run spread)")
    parser.add_argument("--parallel", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="CPU threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(machine())
    held_out = 2 * args.num_samples  # evaluate's floor compares two halves of N real images
    hand_eval, hand_roots = split(args.data, "Hand", held_out, args.work, SIZES)
    cxr_eval, cxr_roots = split(args.data, "CXR", held_out, args.work, (500,))
    jobs = [(f"hand_{size}_{mode}", hand_roots[size], hand_eval, [f"train.d_augment={mode}"])
            for size in SIZES for mode in MODES]
    jobs += [("cxr_500_scratch", cxr_roots[500], cxr_eval, [f"train.d_augment={args.cxr_augment}"]),
             ("cxr_500_from_hand", cxr_roots[500], cxr_eval,
              [f"train.d_augment={args.cxr_augment}", f"train.init_from={SHIPPED_HAND}"])]
    from mednist_gan.config.load import load_config

    recipe_seed = load_config(REPO / "configs" / "resnet.yaml").train.seed
    seeds = [recipe_seed + k for k in range(1, args.repeat_full + 1)]
    jobs += [(f"hand_full_none_seed{seed}", hand_roots["full"], hand_eval,
              ["train.d_augment=none", f"train.seed={seed}"]) for seed in seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: train_and_score(*job[:3], args, job[3]), jobs))
    by_run = {r["run"]: r for r in results}
    print(f"\n{args.iterations} iterations at batch {args.batch}, width {args.width}, precision {args.precision}; "
          f"FD-SSL at N = "
          f"{args.num_samples} vs held-out real images (lower is better)\n")
    print("| Hand training images | " + " | ".join(MODES) + " |")
    print("| --- | " + " | ".join("---" for _ in MODES) + " |")
    for size in SIZES:
        print(f"| {size} | " + " | ".join(f"{by_run[f'hand_{size}_{mode}']['fd_ssl']:.3f}" for mode in MODES) + " |")
    print(f"\n| 500 CXR images ({args.cxr_augment}) | FD-SSL |\n| --- | --- |")
    for name in ("cxr_500_scratch", "cxr_500_from_hand"):
        print(f"| {name.removeprefix('cxr_500_')} | {by_run[name]['fd_ssl']:.3f} |")
    full = by_run["hand_full_none"]["fd_ssl"]
    if args.repeat_full:
        repeats = [full] + [by_run[f"hand_full_none_seed{seed}"]["fd_ssl"] for seed in seeds]
        print(f"\nthe full set without augmentation, seeds {recipe_seed}..{seeds[-1]}: FD-SSL "
              + ", ".join(f"{v:.3f}" for v in repeats) + f" (largest / smallest {max(repeats) / min(repeats):.2f})")
    best = min(by_run["hand_1000_ada"]["fd_ssl"], by_run["hand_1000_diffaugment"]["fd_ssl"])
    print()
    failed = verdict("1,000 Hand images with ADA or DiffAugment vs the full set without", best / full, TARGET_VS_FULL,
                     at_least=False)
    failed |= verdict("500 CXR images: fine-tuned from the Hand generator vs from scratch",
                      by_run["cxr_500_from_hand"]["fd_ssl"] / by_run["cxr_500_scratch"]["fd_ssl"], 1.0,
                      at_least=False)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results},
                                       indent=2) + "\n")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
