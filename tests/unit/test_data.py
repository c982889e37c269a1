"""The data path against MONAI's own transforms on real MedNIST images."""

from __future__ import annotations

import hashlib
import http.server
import math
import os
import shutil
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import (EnsureChannelFirst, Flip, LoadImage, RandFlip, RandRotate, RandZoom, Rotate,
                              ScaleIntensity, Zoom)

import mednist_gan.data
from mednist_gan.config import DataConfig
from mednist_gan.data import (AugmentParams, EpochShuffleSampler, apply_augment, flip, image_folder, list_images,
                              load_dataset, load_images, rotate, sample_augment_params, scale_intensity, zoom)
from mednist_gan.errors import DataError


@pytest.fixture(scope="module")
def hands(mednist_root):
    files = list_images(mednist_root / "Hand")[:32]
    return files, scale_intensity(load_images(files))


def _monai_image(path: Path) -> torch.Tensor:
    image = LoadImage(reader="PILReader", image_only=True)(str(path))
    return ScaleIntensity()(EnsureChannelFirst(channel_dim="no_channel")(image)).as_tensor()


def test_decode_and_scale_equal_monai_exactly(hands):
    files, images = hands
    reference = torch.stack([_monai_image(f) for f in files])
    assert images.dtype == torch.float32 and images.shape == (32, 1, 64, 64)
    assert torch.equal(images, reference)


def test_orientation_is_monai_transpose_of_the_jpeg(hands):
    from PIL import Image

    files, images = hands
    picture = np.asarray(Image.open(files[0]))
    raw = load_images(files[:1])[0, 0].numpy()
    assert np.array_equal(raw, picture.T) and not np.array_equal(raw, picture)


def test_flip_equals_monai_flip_axis0_exactly(hands):
    _, x = hands
    mask = torch.arange(32) % 2 == 0
    out = flip(x, mask)
    for i in range(32):
        expected = Flip(spatial_axis=0)(x[i]).as_tensor() if mask[i] else x[i]
        assert torch.equal(out[i], expected)
    # The other axis would turn hands upside down while keeping every pixel statistic.
    assert not torch.equal(out[0], Flip(spatial_axis=1)(x[0]).as_tensor())


@pytest.mark.parametrize("angle", [-math.pi / 12, -0.1, 0.03, 0.2, math.pi / 12])
def test_rotate_equals_monai_rotate(hands, angle):
    _, x = hands
    out = rotate(x, torch.full((32,), angle))
    expected = torch.stack([Rotate(angle, keep_size=True)(xi).as_tensor() for xi in x])
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("factor", [0.9, 0.93, 0.97, 1.0, 1.02, 1.05, 1.08, 1.1])
def test_zoom_equals_monai_zoom(hands, factor):
    _, x = hands
    out = zoom(x, torch.full((32,), factor))
    expected = torch.stack([Zoom(factor, keep_size=True)(xi).as_tensor() for xi in x])
    assert torch.allclose(out, expected, atol=1e-5)


def test_batched_augment_equals_monai_compose_per_sample(hands):
    """Random parameters, mixed within the batch: rotate -> flip -> zoom, as the bundle's Compose."""
    _, x = hands
    torch.manual_seed(3)
    p = sample_augment_params(32, "cpu")
    out = apply_augment(x, p)
    for i in range(32):
        xi = x[i]
        if p.rotate[i]:
            xi = Rotate(p.angle[i].item(), keep_size=True)(xi)
        if p.flip[i]:
            xi = Flip(spatial_axis=0)(xi)
        if p.zoom[i]:
            xi = Zoom(p.factor[i].item(), keep_size=True)(xi)
        assert torch.allclose(out[i], torch.as_tensor(xi), atol=1e-5), f"sample {i}"
    untouched = ~(p.rotate | p.flip | p.zoom)
    assert torch.equal(out[untouched], x[untouched])


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("selected", ["none", "one", "all"])
def test_augment_handles_empty_single_and_full_selections(hands, batch, selected):
    """Small per-device batches often select no sample (or every sample) for a transform: no crash, right output."""
    _, x = hands
    x = x[:batch]
    mask = {"none": torch.zeros(batch, dtype=torch.bool), "all": torch.ones(batch, dtype=torch.bool),
            "one": torch.arange(batch) == 0}[selected]
    angle, factor = torch.full((batch,), 0.2), torch.full((batch,), 0.9)
    assert torch.equal(rotate(x[:0], angle[:0]), x[:0]) and torch.equal(zoom(x[:0], factor[:0]), x[:0])
    for transform in ("rotate", "flip", "zoom"):
        p = AugmentParams(rotate=mask & (transform == "rotate"), angle=angle, flip=mask & (transform == "flip"),
                          zoom=mask & (transform == "zoom"), factor=factor)
        out = apply_augment(x, p)
        assert out.shape == x.shape
        assert torch.equal(out[~mask], x[~mask]), transform  # unselected samples untouched
        changed = (out[mask] - x[mask]).flatten(1).abs().amax(1)
        assert bool((changed > 0).all()), transform  # selected samples transformed


def test_parameters_drawn_for_the_global_batch_slice_like_the_batch():
    """Each process's slice of the global draw is what one process with the whole batch uses for those images."""
    whole = sample_augment_params(8, "cpu", torch.Generator().manual_seed(5))
    halves = sample_augment_params(8, "cpu", torch.Generator().manual_seed(5))
    for rank in range(2):
        part = halves[rank * 4:(rank + 1) * 4]
        for key, value in vars(part).items():
            assert torch.equal(value, getattr(whole, key)[rank * 4:(rank + 1) * 4]), key
    # A generator makes the draw independent of the global RNG.
    torch.manual_seed(0)
    a = sample_augment_params(8, "cpu", torch.Generator().manual_seed(5))
    torch.rand(3)
    b = sample_augment_params(8, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a.angle, b.angle)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def test_random_parameters_follow_monai_distributions(hands):
    n = 4000
    _, x = hands
    rand_rotate = RandRotate(range_x=math.pi / 12, prob=0.5, keep_size=True).set_random_state(0)
    rand_flip = RandFlip(spatial_axis=0, prob=0.5).set_random_state(1)
    rand_zoom = RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5).set_random_state(2)
    monai_rot, monai_flip, monai_zoom = [], [], []
    for _ in range(n):
        rand_rotate.randomize()
        monai_rot.append(rand_rotate.x if rand_rotate._do_transform else None)
        rand_flip.randomize(None)
        monai_flip.append(rand_flip._do_transform)
        rand_zoom.randomize(x[0])
        monai_zoom.append(rand_zoom._zoom[0] if rand_zoom._do_transform else None)
    torch.manual_seed(0)
    p = sample_augment_params(n, "cpu")
    for ours_mask, theirs in ((p.rotate, monai_rot), (p.zoom, monai_zoom)):
        theirs_mask = np.array([t is not None for t in theirs])
        assert abs(ours_mask.float().mean().item() - theirs_mask.mean()) < 0.05
    assert abs(p.flip.float().mean().item() - np.mean(monai_flip)) < 0.05
    # Two-sample Kolmogorov-Smirnov at alpha = 0.001: critical value 1.95 * sqrt(2 / m) for m ~ n/2 each.
    critical = 1.95 * math.sqrt(2 / (n / 2))
    assert _ks_statistic(p.angle[p.rotate].numpy(), np.array([t for t in monai_rot if t is not None])) < critical
    assert _ks_statistic(p.factor[p.zoom].numpy(), np.array([t for t in monai_zoom if t is not None])) < critical
    # ...and the statistic does detect a wrong range.
    assert _ks_statistic(p.angle[p.rotate].numpy() * 1.5, np.array([t for t in monai_rot if t is not None])) > critical


def test_image_cache_is_reused_and_invalidated(tmp_path, mednist_root):
    folder = tmp_path / "Hand"
    shutil.copytree(mednist_root / "Hand", folder, ignore=lambda d, names: sorted(names)[10:])
    cache = tmp_path / "cache"
    first = load_images(list_images(folder), cache_dir=str(cache))
    assert len(list(cache.glob("images-*.pt"))) == 1
    assert torch.equal(load_images(list_images(folder), cache_dir=str(cache)), first)
    shutil.copy(mednist_root / "Hand" / "009999.jpeg", folder / "zzz.jpeg")
    assert len(load_images(list_images(folder), cache_dir=str(cache))) == 11
    assert len(list(cache.glob("images-*.pt"))) == 2


def test_non_utf8_file_names_load_and_use_the_cache(tmp_path, mednist_root, monkeypatch):
    folder = tmp_path / "Hand"
    folder.mkdir()
    sources = list_images(mednist_root / "Hand")[:3]
    for f in sources[:2]:
        shutil.copy(f, folder / f.name)
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpeg"), "wb") as out:
            out.write(sources[2].read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    cfg = DataConfig(root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    first = load_dataset(cfg, [1, 64, 64])
    assert first.shape == (3, 1, 64, 64) and len(list((tmp_path / "cache").glob("images-*.pt"))) == 1
    monkeypatch.setattr(mednist_gan.data, "_decode", lambda *args: pytest.fail("decoded again: cache not used"))
    assert torch.equal(load_dataset(cfg, [1, 64, 64]), first)


def _save_as(folder: Path, picture: np.ndarray) -> None:
    """The same 8-bit picture as 8-bit, 16-bit and palette PNGs (named so they sort in that order)."""
    from PIL import Image

    Image.fromarray(picture).save(folder / "a-8bit.png")
    Image.fromarray(picture.astype(np.uint16) * 257).save(folder / "b-16bit.png")
    # 16-bit values less than half an 8-bit grey level away from v * 257 still decode to v.
    off = np.random.default_rng(0).integers(-128, 129, picture.shape)
    Image.fromarray(np.clip(picture.astype(np.int64) * 257 + off, 0, 65535).astype(np.uint16)).save(
        folder / "c-16bit.png")
    # Palette index 255 - v holds grey v: decoding the indices themselves would give the negative.
    palette = Image.new("P", picture.shape[::-1])
    palette.putdata((255 - picture).flatten().tolist())
    palette.putpalette([255 - i for i in range(256) for _ in range(3)])
    palette.save(folder / "d-palette.png")


def test_16_bit_and_palette_pngs_train_like_the_8_bit_picture(tmp_path, mednist_root):
    from PIL import Image

    folder = tmp_path / "Hand"
    folder.mkdir()
    picture = np.array(Image.open(mednist_root / "Hand" / "000000.jpeg"))
    _save_as(folder, picture)
    assert [Image.open(f).mode for f in list_images(folder)] == ["L", "I;16", "I;16", "P"]
    images = load_dataset(DataConfig(root=str(tmp_path), cache_dir=None), [1, 64, 64])
    assert images.shape == (4, 1, 64, 64) and torch.equal(images[0, 0], torch.from_numpy(picture.T))
    for i in range(1, 4):
        assert torch.equal(images[i], images[0]), list_images(folder)[i].name
    training = scale_intensity(images)  # what the trainer feeds the networks
    assert float((training - training[:1]).abs().max()) <= 1 / 255


def _coloured_palette(picture):
    palette = picture.convert("P")
    palette.putpalette([c for i in range(256) for c in (i, i, 0 if i % 2 else i)])  # odd greys turned yellow
    return palette


@pytest.mark.parametrize("name, make, mode", [
    ("la.png", lambda picture: picture.convert("LA"), "mode LA"),
    ("rgba.png", lambda picture: picture.convert("RGBA"), "mode RGBA"),
    ("rgb.png", lambda picture: picture.convert("RGB"), "mode RGB"),
    ("colours.png", _coloured_palette, "mode P with colours in its palette"),
], ids=["LA", "RGBA", "RGB", "colour-palette"])
def test_images_that_are_not_grey_are_refused_naming_the_mode(tmp_path, mednist_root, name, make, mode):
    from PIL import Image

    make(Image.open(mednist_root / "Hand" / "000000.jpeg")).save(tmp_path / name)
    with pytest.raises(DataError, match=rf"{name}: expected a single-channel \(grayscale\) image, got {mode}$"):
        load_images([tmp_path / name])


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*no Hand/ folder"):
        image_folder(DataConfig(root=str(tmp_path / "missing")))
    (tmp_path / "Hand").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_dataset(DataConfig(root=str(tmp_path), cache_dir=None), [1, 64, 64])


def test_bad_image_is_named_or_skipped(tmp_path, mednist_root):
    folder = tmp_path / "Hand"
    folder.mkdir()
    for f in list_images(mednist_root / "Hand")[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpeg: cannot be read as an image"):
        load_dataset(DataConfig(root=str(tmp_path), cache_dir=None), [1, 64, 64])
    images = load_dataset(DataConfig(root=str(tmp_path), cache_dir=None, bad_files="skip"), [1, 64, 64])
    assert images.shape == (3, 1, 64, 64)


def test_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(4)
    assert list(a) != list(b)


def test_shipped_sample_is_default_and_loads():
    images = load_dataset(DataConfig(cache_dir=None), [1, 64, 64])
    assert images.shape[0] >= 100 and images.dtype == torch.uint8


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_from_a_local_server_with_md5_check(tmp_path, mednist_root):
    """MONAI's download utility fetches and verifies a MedNIST.tar.gz served on localhost."""
    src = tmp_path / "src" / "MedNIST" / "Hand"
    src.mkdir(parents=True)
    for f in list_images(mednist_root / "Hand")[:5]:
        shutil.copy(f, src / f.name)
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "MedNIST.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "MedNIST", arcname="MedNIST")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/MedNIST.tar.gz"
        with pytest.raises(DataError, match="download or verification failed"):
            image_folder(DataConfig(root=str(tmp_path / "bad"), download=True, url=url, md5="0" * 32))
        folder = image_folder(DataConfig(root=str(tmp_path / "data"), download=True, url=url, md5=md5))
        assert folder == tmp_path / "data" / "MedNIST" / "Hand"
        assert len(list_images(folder)) == 5
        # Downloaded once: the next call finds the folder without the server.
        server.shutdown()
        assert image_folder(DataConfig(root=str(tmp_path / "data"), download=True, url=url, md5=md5)) == folder
    finally:
        server.shutdown()
        server.server_close()
