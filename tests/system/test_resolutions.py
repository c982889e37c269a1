"""The residual networks at 128 and 256: the presets train, export, generate and are scored (after area
interpolation to the feature extractors' 64x64) on folders of images of that size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from helpers import CONFIGS, run_cli, sample_hands

TINY = ["model.resnet_g_channels=2", "model.resnet_d_channels=2", "train.batch_size=8", "train.max_steps=2",
        "train.d_train_steps=1", "eval.every_steps=null", "log.sample_every=2", "log.num_samples=4",
        "checkpoint.every_steps=null"]


def hands_at(size: int, folder):
    """The sample's hands scaled up to ``size`` x ``size`` 8-bit PNGs in ``folder``/Hand."""
    (folder / "Hand").mkdir(parents=True)
    for name, picture in sample_hands(size):
        Image.fromarray(picture).save(folder / "Hand" / f"{name}.png")
    return folder


@pytest.mark.parametrize("size", [128, 256])
def test_a_preset_trains_exports_generates_and_is_scored_at_its_size(size, tmp_path):
    data, run = hands_at(size, tmp_path / "data"), tmp_path / "run"
    result = run_cli("train", "--config", str(CONFIGS / f"resnet{size}.yaml"), f"run_dir={run}", f"data.root={data}",
                     f"data.cache_dir={tmp_path / 'cache'}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(run / "samples" / "step_000002.png").size[1] == 2 * (size + 2) + 2  # two rows of two
    export = run / "export"
    assert json.loads((export / "export.json").read_text())["config"]["model"]["image_shape"] == [1, size, size]
    result = run_cli("generate", "--model", str(export / "mednist_gan.ts"), "--num-samples", "3",
                     "--output-dir", str(tmp_path / "png"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [np.asarray(Image.open(p)).shape for p in sorted((tmp_path / "png").glob("*.png"))] == [(size, size)] * 3
    result = run_cli("evaluate", "--model", str(export / "model.pt"), "--real-dir", str(data / "Hand"),
                     "--num-samples", "16", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert len(rows) == 2 and all(math.isfinite(row["fd_ssl"]) for row in rows)
