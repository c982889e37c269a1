"""benchmarks/train_presets.sh, the prepared device run of issue #17: device time is scarce, so the script itself
is run here, end to end on the CPU at a tiny width: two runs train side by side (a Hand variant named with its own
overrides, the conditional preset), and each is scored as the device run scores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

pytestmark = pytest.mark.slow


def test_the_prepared_device_run_trains_side_by_side_and_scores_each_run(tmp_path, mednist_root, upstream_weights):
    out = tmp_path / "out"
    env = {**os.environ, "MEDNIST_ROOT": str(mednist_root), "MEDNIST_GAN_UPSTREAM": str(upstream_weights),
           "OUT": str(out), "RUNS": str(tmp_path / "runs"),
           "PRESETS": "conditional plain:configs/resnet.yaml:model.resnet_d_sn=false:train.d_train_steps=1",
           "PRECISION": "no", "MAX_STEPS": "2", "N": "40", "LIMIT_S": "300",
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
    config = yaml.safe_load((tmp_path / "runs" / "plain" / "config.yaml").read_text())  # its own overrides
    assert config["model"]["resnet_d_sn"] is False and config["train"]["d_train_steps"] == 1
    assert config["train"]["max_steps"] == 2 and config["eval"]["every_steps"] is None  # EXTRA came last

    for presets, error in [("wide bigger", "unknown preset 'bigger'"),
                           ("wide x:configs/nope.yaml:train.d_train_steps=2", "configs/nope.yaml (PRESETS entry")]:
        refused = subprocess.run(["bash", "benchmarks/train_presets.sh"], cwd=REPO, env={**env, "PRESETS": presets},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and error in refused.stderr, refused.stderr
