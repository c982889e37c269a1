"""Copy an equal share of every MedNIST class folder into a folder small enough to travel with the repository.

The GPU machine of the `device` tool receives the repository and the paths named in `carry`, 64 MiB in all, and
not the MedNIST folders beside it; the complete MedNIST is 78 MB of JPEGs. This copies the first K images (by
name) of every class, the largest K whose files fit in --max-mib (a class with fewer images gives all of them),
and the source's SOURCE.md (provenance and licence), so that training there reads real MedNIST:

    python benchmarks/pack_subset.py --src ../shared/data/mednist-full --dst .device/mednist --max-mib 34
    # then: run(command="MEDNIST_ROOT=.device/mednist ... bash benchmarks/train_presets.sh", carry=[".device"])

`.device/` is ignored by git. An existing --dst is replaced only when it holds nothing but class folders and
SOURCE.md (an earlier pack), so a mistyped --dst never deletes anything else.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from mednist_gan.data import list_images
from mednist_gan.errors import DataError


def class_files(src: Path) -> dict[str, list[Path]]:
    """Each class folder of ``src`` (a folder holding images) and its images, sorted by name."""
    classes = {}
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        try:
            classes[folder.name] = list_images(folder)
        except DataError:  # not a class folder: no images in it
            continue
    return classes


def largest_share(classes: dict[str, list[Path]], budget: int) -> int:
    """The largest K such that the first K files of every class (all of a smaller class) fit in ``budget`` bytes."""
    sizes = {name: [f.stat().st_size for f in files] for name, files in classes.items()}

    def total(k: int) -> int:
        return sum(sum(s[:k]) for s in sizes.values())

    lo, hi = 0, max(len(s) for s in sizes.values())
    while lo < hi:  # total(k) grows with k: bisect for the last k that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid - 1)
    return lo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="MedNIST folder of class folders")
    parser.add_argument("--dst", type=Path, required=True, help="folder to write (inside the repository: .device/...)")
    parser.add_argument("--max-mib", type=float, default=34.0, help="size of the copied images, at most (MiB)")
    args = parser.parse_args()
    if not args.src.is_dir() or not (classes := class_files(args.src)):
        print(f"pack_subset.py: --src {args.src} holds no class folders of images", file=sys.stderr)
        return 2
    if args.dst.exists():
        foreign = [p.name for p in args.dst.iterdir()
                   if p.name != "SOURCE.md" and not (p.is_dir() and p.name in classes)]
        if foreign:
            print(f"pack_subset.py: --dst {args.dst} holds other things ({', '.join(sorted(foreign)[:3])}); "
                  "expected a new folder or an earlier pack", file=sys.stderr)
            return 2
        shutil.rmtree(args.dst)
    k = largest_share(classes, int(args.max_mib * 2**20))
    if k == 0:
        print(f"pack_subset.py: --max-mib {args.max_mib} does not hold one image per class", file=sys.stderr)
        return 2
    copied = 0
    for name, files in classes.items():
        (args.dst / name).mkdir(parents=True)
        for f in files[:k]:
            shutil.copyfile(f, args.dst / name / f.name)
            copied += f.stat().st_size
    if (args.src / "SOURCE.md").exists():
        shutil.copyfile(args.src / "SOURCE.md", args.dst / "SOURCE.md")
    counts = ", ".join(f"{name} {min(k, len(files))}" for name, files in classes.items())
    print(f"{args.dst}: {counts} images, {copied / 2**20:.1f} MiB (first {k} of each class by name)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
