"""Your own images, end to end: a folder of 16-bit PNGs at 512x512 and a folder of CT DICOM slices each go through
prepare-data, then train, export and evaluate with one command each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from dicom_files import write_ct_slice
from helpers import CONFIGS, run_cli, sample_hands



def sixteen_bit_pngs(src):
    (src / "Hand").mkdir(parents=True)
    for name, big in sample_hands(512):
        Image.fromarray(big.astype(np.uint16) * 257).save(src / "Hand" / f"{name}.png")
    return [], "Hand"


def ct_dicom_slices(src):
    (src / "CT").mkdir(parents=True)
    for name, big in sample_hands(512):
        write_ct_slice(src / "CT" / f"{name}.dcm", big.astype(np.int32) * 8)  # Hounsfield units -1024..1016
    return ["--window", "-1000", "1000"], "CT"


@pytest.mark.parametrize("make", [sixteen_bit_pngs, ct_dicom_slices], ids=["16-bit PNG 512x512", "CT DICOM"])
def test_prepare_then_train_export_and_evaluate(make, tmp_path):
    src, data, run = tmp_path / "src", tmp_path / "data", tmp_path / "run"
    options, name = make(src)
    result = run_cli("prepare-data", str(src), str(data), "--size", "64", *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"  {name}: 40 images; sizes 512x512 (40)" in result.stdout
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}", f"data.root={data}",
                     f"data.classes=[{name}]", "data.limit=null", f"data.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "export" / "mednist_gan.ts").is_file()
    result = run_cli("evaluate", "--model", str(run / "export" / "model.pt"), "--real-dir", str(data / name),
                     "--num-samples", "16", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(row["fd_ssl"]) for row in json.loads((tmp_path / "e.json").read_text())["rows"])


def test_train_straight_from_the_source_folder(tmp_path):
    """data.resize and data.intensity: DICOM slices at 512x512 train without prepare-data, and the dry run says so."""
    src, run = tmp_path / "src", tmp_path / "run"
    ct_dicom_slices(src)
    common = ["train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}", f"data.root={src}",
              "data.classes=[CT]", "data.limit=null", f"data.cache_dir={tmp_path / 'cache'}",
              "data.resize=center-crop", "data.intensity={min: -1000, max: 1000}"]
    result = run_cli(*common, "--dry-run")
    assert result.returncode == 0 and "CT 40 images" in result.stdout, result.stderr[-3000:]
    result = run_cli(*common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "export" / "model.pt").is_file() and len(list((tmp_path / "cache").iterdir())) == 1
