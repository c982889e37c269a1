"""benchmarks/train_presets.sh, the prepared device run of issue #17: device time is scarce, so the script itself
is run here, end to end on the CPU at a tiny width: two runs train side by side (a Hand variant named with its own
overrides, the conditional preset), and each is scored as the device run scores it; and pack_subset.py, which packs
the data that travels there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from helpers import REPO


def test_the_prepared_device_run_trains_side_by_side_and_scores_each_run(tmp_path, mednist_root, upstream_weights):
    out = tmp_path / "out"
    env = {**os.environ, "MEDNIST_ROOT": str(mednist_root), "MEDNIST_GAN_UPSTREAM": str(upstream_weights),
           "OUT": str(out), "RUNS": str(tmp_path / "runs"),
           "PRESETS": "conditional plain:configs/resnet.yaml:model.resnet_d_sn=false:train.d_train_steps=1",
           "PRECISION": "no", "MAX_STEPS": "2", "N": "40", "LIMIT_S": "300", "KEEP": "1", "PART_SIZE": "20K",
           "EXTRA": (f"data.limit=16 data.cache_dir={tmp_path / 'cache'} train.batch_size=8 eval.every_steps=null "
                     "model.latent_size=16 model.resnet_g_channels=2 model.resnet_d_channels=2 model.resnet_mbstd=4"),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "benchmarks/train_presets.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("conditional", "plain"):
        assert f"train {name}: rc=0" in done.stdout and f"evaluate {name}: rc=0" in done.stdout, done.stdout
    hand = json.loads((out / "evaluate_plain.json").read_text())
    assert hand["class"] == "Hand" and hand["num_samples"] == 40
    # the floor, real images blurred with sigma 1.5 (the targets' yardstick), the run, the seed with both latents
    assert [row["latent"] for row in hand["rows"]] == [None, "blurred", "normal", "normal", "uniform"]
    assert all(row["fd_ssl"] > 0 for row in hand["rows"])
    conditional = json.loads((out / "evaluate_conditional.json").read_text())
    assert len(conditional["classes"]) == 6 and "usefulness" in conditional
    assert all(block["rows"][1]["name"] == "real blurred, sigma 1.5" for block in conditional["classes"])
    for name in ("conditional", "plain"):  # KEEP=1: the generator in parts that join to the same bytes
        keep, export = out / f"keep_{name}", tmp_path / "runs" / name / "export"
        parts = sorted(keep.glob("model.pt.part*"))
        joined = b"".join(p.read_bytes() for p in parts)
        assert len(parts) > 1 and all(p.stat().st_size <= 20 * 1024 for p in parts)
        assert joined == (export / "model.pt").read_bytes() and (keep / "export.json").exists()
        assert (keep / "model.pt.sha256").read_text().split()[1] == "model.pt"
    config = yaml.safe_load((tmp_path / "runs" / "plain" / "config.yaml").read_text())  # its own overrides
    assert config["model"]["resnet_d_sn"] is False and config["train"]["d_train_steps"] == 1
    assert config["train"]["max_steps"] == 2 and config["eval"]["every_steps"] is None  # EXTRA came last

    for presets, error in [("wide bigger", "unknown preset 'bigger'"),
                           ("wide x:configs/nope.yaml:train.d_train_steps=2", "configs/nope.yaml (PRESETS entry")]:
        refused = subprocess.run(["bash", "benchmarks/train_presets.sh"], cwd=REPO, env={**env, "PRESETS": presets},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and error in refused.stderr, refused.stderr


def test_pack_subset_copies_an_equal_share_of_every_class_that_fits(tmp_path, mednist_root):
    """benchmarks/pack_subset.py: the data that travels to the device (not ../shared): the first K images of every
    class by name, K the largest that fits the budget, with SOURCE.md; a folder holding anything else is refused."""
    dst, budget_kib = tmp_path / "pack", 60

    def pack(target):
        return subprocess.run([sys.executable, "benchmarks/pack_subset.py", "--src", str(mednist_root), "--dst",
                               str(target), "--max-mib", str(budget_kib / 1024)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    done = pack(dst)
    assert done.returncode == 0, done.stderr
    classes = sorted(p.name for p in dst.iterdir() if p.is_dir())
    assert classes == sorted(p.name for p in mednist_root.iterdir() if p.is_dir())
    counts = {len(list((dst / c).iterdir())) for c in classes}
    assert len(counts) == 1 and (k := counts.pop()) > 1, counts
    for c in classes:
        assert sorted(p.name for p in (dst / c).iterdir()) == sorted(p.name for p in (mednist_root / c).iterdir())[:k]
    size = sum(f.stat().st_size for c in classes for f in (dst / c).iterdir())
    one_more = sum(sorted((mednist_root / c).iterdir())[k].stat().st_size for c in classes)
    assert size <= budget_kib * 1024 < size + one_more  # the largest share that fits
    assert (dst / "SOURCE.md").read_text() == (mednist_root / "SOURCE.md").read_text()
    assert pack(dst).returncode == 0  # an earlier pack is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = pack(tmp_path / "mine")
    assert refused.returncode == 2 and "holds other things (notes.txt)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
