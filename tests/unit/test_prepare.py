"""prepare-data: your own images (16-bit PNG, TIFF, DICOM, any size) read at full precision, brought to one square
size and intensity range, and written as the 8-bit PNG training set with a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mednist_gan.config import DataConfig
from mednist_gan.data import load_labelled_dataset
from mednist_gan.errors import ConfigError, DataError, OutputError
from mednist_gan.prepare import fit_size, prepare_data, read_grey, to_levels

from dicom_files import write_ct_slice
from helpers import file_hashes


def test_each_resize_mode_reaches_the_square_size():
    image = np.arange(100 * 200, dtype=np.float64).reshape(100, 200)
    crop = fit_size(image, 50, "center-crop", "area")  # 100x200 -> 50x100 -> the middle 50 columns
    assert crop.shape == (50, 50)
    assert torch.allclose(crop, fit_size(image[:, 50:150], 50, "stretch", "area"))
    pad = fit_size(image, 50, "pad", "nearest")  # 100x200 -> 25x50, padded above and below with the minimum
    assert pad.shape == (50, 50) and pad[:12].eq(0).all() and pad[-13:].eq(0).all() and pad[12:37].gt(0).any()
    assert fit_size(image, 64, "stretch", "bicubic").shape == (64, 64)
    same = np.random.default_rng(0).random((64, 64))
    assert torch.equal(fit_size(same, 64, "center-crop", "bilinear"), torch.from_numpy(same))  # nothing to do


def test_intensity_per_image_or_by_a_fixed_window():
    hu = torch.tensor([[-2000.0, -1000.0], [0.0, 3000.0]])
    assert to_levels(hu, (-1000, 1000)).tolist() == [[0, 0], [128, 255]]  # clipped outside the window
    assert to_levels(hu, None).tolist() == [[0, 51], [102, 255]]  # minimum to maximum
    assert to_levels(torch.full((2, 2), 7.0), None).tolist() == [[0, 0], [0, 0]]


def test_full_precision_from_16_bit_png_tiff_and_dicom(tmp_path):
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520: more than 256 levels
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        image, mode = read_grey(tmp_path / name)
        assert np.array_equal(image, values) and mode.startswith("I"), (name, mode)
    write_ct_slice(tmp_path / "a.dcm", (values // 16).astype(np.int16), intercept=-1024)
    image, mode = read_grey(tmp_path / "a.dcm")
    assert mode == "DICOM CT" and image.min() == -1024 and image.max() == 4095 - 1024


def _folder(tmp_path, size: int = 512, count: int = 3):
    src = tmp_path / "src"
    for name in ("Knee", "Spine"):
        (src / name).mkdir(parents=True)
        for i in range(count):
            wave = np.sin(np.linspace(0, 3 + i, size))[:, None] * np.cos(np.linspace(0, 2, size))[None, :]
            Image.fromarray(((wave + 1) * 30000).astype(np.uint16)).save(src / name / f"{i}.png")
    (src / "Knee" / "broken.png").write_bytes(b"not a png")
    (src / "Knee" / "notes.txt").write_text("not an image, not counted")
    return src


def test_prepare_data_writes_the_set_and_reports_it(tmp_path):
    src, dst = _folder(tmp_path), tmp_path / "dst"
    report = prepare_data(src, dst, size=64)
    assert sorted(p.name for p in dst.iterdir()) == ["Knee", "Spine", "prepare.json"]
    pictures = [np.asarray(Image.open(p)) for p in sorted((dst / "Knee").iterdir())]
    assert len(pictures) == 3 and all(p.shape == (64, 64) and p.dtype == np.uint8 for p in pictures)
    assert pictures[0].min() == 0 and pictures[0].max() == 255  # each image from its minimum to its maximum
    knee = report["classes"]["Knee"]
    assert knee["images"] == 3 and knee["sizes"] == {"512x512": 3} and knee["modes"] == {"I;16": 3}
    assert len(knee["unreadable"]) == 1 and knee["unreadable"][0].startswith("broken.png: cannot be read")
    assert json.loads((dst / "prepare.json").read_text()) == report


def test_prepare_data_never_writes_over_a_folder_and_leaves_nothing_when_it_fails(tmp_path):
    src, dst = _folder(tmp_path), tmp_path / "dst"
    (dst / "mine").mkdir(parents=True)
    (dst / "mine" / "x.png").write_bytes(b"a user's file")
    before = file_hashes(dst)
    with pytest.raises(OutputError, match="exists and is not an empty folder"):
        prepare_data(src, dst)
    assert file_hashes(dst) == before
    for path in (src / "Spine").iterdir():
        path.write_bytes(b"broken")
    with pytest.raises(DataError, match="no usable image in Spine; nothing was written"):
        prepare_data(src, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left


def _mixed_folder(tmp_path):
    """One class of a lab's own files: 16-bit PNGs, a TIFF and CT DICOM slices, none of them 64x64 or square."""
    src = tmp_path / "src" / "Scan"
    src.mkdir(parents=True)
    y, x = np.mgrid[0:96, 0:128]
    for i in range(2):
        Image.fromarray((x * 300 + y * 100 * (i + 1)).astype(np.uint16)).save(src / f"png{i}.png")
    Image.fromarray((y * 500).astype(np.uint16)).save(src / "slice.tif")
    write_ct_slice(src / "slice.dcm", (x * 20 + y).astype(np.int16) * 2, intercept=-1024)
    return src.parent


@pytest.mark.parametrize("resize, window", [("center-crop", None), ("pad", (-1000.0, 1000.0)), ("stretch", None)])
def test_training_reads_your_own_files_as_prepare_data_writes_them(tmp_path, resize, window):
    """data.resize / data.intensity give training the images prepare-data would have written (in MONAI's
    orientation), decoded once into the cache; without them such a folder is refused naming data.resize."""
    src = _mixed_folder(tmp_path)
    prepare_data(src, tmp_path / "prepared", size=64, resize=resize, interpolation="bilinear", window=window)
    assert len(list((tmp_path / "prepared" / "Scan").iterdir())) == 4  # slice.dcm and slice.tif stay two images
    prepared, _ = load_labelled_dataset(DataConfig(root=str(tmp_path / "prepared"), classes=["Scan"], cache_dir=None),
                                        [1, 64, 64])
    intensity = None if window is None else {"min": window[0], "max": window[1]}
    own = DataConfig(root=str(src), classes=["Scan"], cache_dir=str(tmp_path / "cache"), resize=resize,
                     interpolation="bilinear", intensity=intensity)
    direct, labels = load_labelled_dataset(own, [1, 64, 64])
    assert direct.shape == (4, 1, 64, 64) and direct.dtype == torch.uint8 and labels.tolist() == [0] * 4
    assert torch.equal(direct, prepared)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert torch.equal(load_labelled_dataset(own, [1, 64, 64])[0], direct)  # read back from the cache
    with pytest.raises(DataError, match=r"png0.png: expected a 64x64 image, got 96x128 \(data.resize: center-crop"):
        load_labelled_dataset(DataConfig(root=str(src), classes=["Scan"], cache_dir=None, intensity=intensity or
                                         {"min": 0, "max": 65535}), [1, 64, 64])


def test_a_different_fit_is_a_different_cache_entry(tmp_path):
    src = _mixed_folder(tmp_path)
    crops = [load_labelled_dataset(DataConfig(root=str(src), classes=["Scan"], cache_dir=str(tmp_path / "c"),
                                              resize=mode), [1, 32, 32])[0] for mode in ("center-crop", "pad")]
    assert not torch.equal(*crops) and len(list((tmp_path / "c").iterdir())) == 2


@pytest.mark.parametrize("value", [{"min": 5, "max": 1}, {"low": 0, "high": 1}, {"min": 0}])
def test_an_intensity_window_needs_min_below_max(value):
    with pytest.raises(ConfigError, match=r"^data.intensity=.* is not allowed: expected \{min: LOW, max: HIGH\}"):
        DataConfig(intensity=value).check()
