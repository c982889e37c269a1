"""Exports (bundle-compatible weights, standalone TorchScript, MONAI bundle) and PNG generation."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from monai.networks.nets import Generator
from PIL import Image

from mednist_gan import checkpoint as ckpt
from mednist_gan.generator.generate import generate
from mednist_gan.images import encode_png

from helpers import BUNDLE_ARGS, REPO, run_cli


def test_model_pt_is_a_drop_in_for_the_bundle_file(exported_run, upstream_weights):
    ours = torch.load(exported_run / "export" / "model.pt", weights_only=True)
    seed = torch.load(upstream_weights, weights_only=True)
    assert list(ours) == list(seed)
    assert all(ours[k].shape == seed[k].shape and ours[k].dtype == seed[k].dtype for k in seed)
    net = Generator(**BUNDLE_ARGS)
    net.load_state_dict(ours, strict=True)
    assert not any("disc" in k or "net." in k for k in ours)  # generator only


def test_export_matches_the_checkpoint_generator(exported_run):
    from safetensors.torch import load_file

    ours = torch.load(exported_run / "export" / "model.pt", weights_only=True)
    checkpoint = load_file(str(ckpt.find_latest(exported_run) / "model.safetensors"))
    assert all(torch.equal(ours[k], checkpoint[k]) for k in ours)
    record = json.loads((exported_run / "export" / "export.json").read_text())
    assert record["step"] == 4 and record["config"]["model"]["latent_size"] == 64
    from mednist_gan.training.run_folder import git_revision

    assert "normal" in record["latent_distribution"]
    assert record["git_revision"] == git_revision()  # None only where this is no usable git checkout
    if record["git_revision"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", record["git_revision"])


# Run as a script in a fresh interpreter where neither monai nor mednist_gan can be imported: a meta-path
# finder refuses them (and anything under them), so an export that needed either would fail to load.
STANDALONE_SCRIPT = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("monai", "mednist_gan"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Refuse())
for name in list(sys.modules):
    if name.split(".")[0] in ("monai", "mednist_gan"):
        del sys.modules[name]
import torch

export, zs, out = sys.argv[1], torch.load(sys.argv[2]), {}
for kind, net in (("pt2", torch.export.load(export + "/mednist_gan.pt2").module()),
                  ("ts", torch.jit.load(export + "/mednist_gan.ts"))):
    assert not any(p.requires_grad for p in net.parameters()), kind
    out[kind] = [net(z) for z in zs]  # outside no_grad, as a user would call it
for blocked in ("monai", "mednist_gan"):
    try:
        __import__(blocked)
    except ImportError:
        print(blocked, "unavailable")
torch.save(out, sys.argv[3])
"""


def test_pt2_and_torchscript_run_with_torch_alone_and_equal_the_eager_generator(exported_run, tmp_path):
    """The .pt2 (torch.export, dynamic batch) and the TorchScript file load and run without monai or mednist_gan,
    for any batch size, equal to the eager generator, and build no autograd graph."""
    export = exported_run / "export"
    zs = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (1, 5)]
    torch.save(zs, tmp_path / "z.pt")
    result = subprocess.run([sys.executable, "-c", STANDALONE_SCRIPT, str(export), str(tmp_path / "z.pt"),
                             str(tmp_path / "out.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "monai unavailable" in result.stdout and "mednist_gan unavailable" in result.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    net = Generator(**BUNDLE_ARGS)
    net.load_state_dict(torch.load(export / "model.pt", weights_only=True))
    for kind in ("pt2", "ts"):
        for z, images in zip(zs, out[kind]):
            assert images.shape == (len(z), 1, 64, 64) and not images.requires_grad, kind
            with torch.no_grad():
                assert torch.allclose(images, torch.sigmoid(net.eval()(z)), atol=1e-6), (kind, len(z))
    record = json.loads((export / "export.json").read_text())
    assert {"model.pt", "mednist_gan.pt2", "mednist_gan.ts"} <= set(record["files"])


def test_exported_modules_are_inference_only_in_this_process_too(exported_run):
    """``net(z)`` outside no_grad: no parameter requires grad, so no autograd graph is built."""
    from mednist_gan.generator.loader import open_generator

    z = torch.randn(3, 64)
    for name in ("mednist_gan.pt2", "mednist_gan.ts"):
        opened = open_generator(exported_run / "export" / name)
        net, latent_size = opened.network, opened.latent_size
        assert latent_size == 64
        images = net(z)
        assert images.shape == (3, 1, 64, 64) and not images.requires_grad and images.grad_fn is None, name


def test_a_damaged_pt2_is_named_in_one_line(exported_run, tmp_path):
    """The .pt2 is checked against the sha256 export.json records for it, as the other exported files are."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(exported_run / "export", out)
    data = bytearray((out / "mednist_gan.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "mednist_gan.pt2").write_bytes(bytes(data))
    result = run_cli("generate", "--model", str(out / "mednist_gan.pt2"), "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{out / 'mednist_gan.pt2'}: damaged or replaced" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_exports_written_before_the_pt2_still_load_and_generate(tmp_path):
    """An export of mednist-gan 0.1.0 (model.pt, mednist_gan.ts, export.json listing no .pt2; latent size 8)
    is still checked against its record and generates the same pictures from either file."""
    old = REPO / "tests" / "fixtures" / "v0.1.0_run" / "export"
    assert "mednist_gan.pt2" not in json.loads((old / "export.json").read_text())["files"]
    from mednist_gan.generator.loader import open_generator

    opened = open_generator(old / "mednist_gan.ts")
    net, latent_size = opened.network, opened.latent_size
    assert latent_size == 8 and net(torch.randn(2, 8)).shape == (2, 1, 64, 64)
    a = generate(old / "mednist_gan.ts", 4, tmp_path / "a", seed=1)
    b = generate(old / "model.pt", 4, tmp_path / "b", seed=1)
    for x, y in zip(a, b):
        assert np.abs(np.asarray(Image.open(x)).astype(int) - np.asarray(Image.open(y))).max() <= 1


def test_generate_writes_upright_8bit_pngs_and_is_seeded(exported_run, tmp_path):
    ts = exported_run / "export" / "mednist_gan.ts"
    a = generate(ts, 10, tmp_path / "a", seed=3, batch_size=4, grid=tmp_path / "grid.png")
    b = generate(ts, 10, tmp_path / "b", seed=3)
    c = generate(ts, 10, tmp_path / "c", seed=4)
    assert len(a) == 10 and all(p.is_file() for p in a)
    image = Image.open(a[0])
    assert image.mode == "L" and image.size == (64, 64)

    def arrays(paths):
        return [np.asarray(Image.open(p)) for p in paths]

    assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(c)))
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    # model.pt, the .pt2 program and the checkpoint folder give the same pictures as the TorchScript file.
    d = generate(exported_run / "export" / "model.pt", 10, tmp_path / "d", seed=3)
    e = generate(ckpt.find_latest(exported_run), 10, tmp_path / "e", seed=3)
    f = generate(exported_run / "export" / "mednist_gan.pt2", 10, tmp_path / "f", seed=3)
    for x, y, w, v in zip(arrays(a), arrays(d), arrays(e), arrays(f)):
        assert max(np.abs(x.astype(int) - other).max() for other in (y, w, v)) <= 1


@pytest.mark.parametrize("shape", [(64, 64), (3, 130), (131, 1)])
def test_png_encoder_round_trips_through_pillow(shape, tmp_path):
    rng = np.random.default_rng(sum(shape))
    for array in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8),
                  np.full(shape, 255, np.uint8)):
        path = tmp_path / "x.png"
        path.write_bytes(encode_png(array))
        image = Image.open(path)
        image.load()  # Pillow checks every chunk's CRC and the zlib stream while decoding
        assert image.mode == "L" and image.size == shape[::-1]
        assert np.array_equal(np.asarray(image), array)
    with pytest.raises(ValueError, match="2-D uint8"):
        encode_png(np.zeros((2, 2), np.float32))


def test_seed_weights_give_the_bundle_pipelines_picture(upstream_weights, tmp_path):
    """Same latent -> the same PNG as the bundle's inference (sigmoid, then SaveImaged scale 255 uint8)."""
    from monai.transforms import Activationsd, SaveImaged

    n, seed = 6, 11
    ours = generate(upstream_weights, n, tmp_path / "ours", seed=seed, latent="uniform")
    latents = torch.rand(n, 64, generator=torch.Generator().manual_seed(seed))
    net = Generator(**BUNDLE_ARGS)
    net.load_state_dict(torch.load(upstream_weights, weights_only=True))
    post_act = Activationsd(keys="pred", sigmoid=True)
    for i in range(n):
        folder = tmp_path / f"monai{i}"
        saver = SaveImaged(keys="pred", output_dir=str(folder), output_ext="png", separate_folder=False, scale=255,
                           output_dtype=np.uint8, meta_key_postfix=None)
        with torch.no_grad():
            saver(post_act({"pred": net.eval()(latents[i:i + 1])[0]}))
        (theirs,) = folder.glob("*.png")
        assert np.array_equal(np.asarray(Image.open(ours[i])), np.asarray(Image.open(theirs))), f"sample {i}"


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples 0: expected an integer >= 1"),
    (["--num-samples", "-3"], "--num-samples -3"),
    (["--output-dir", "{file}"], "exists and is not a folder"),
])
def test_generate_bad_arguments_are_one_line(exported_run, tmp_path, args, message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [a.replace("{file}", str(afile)) for a in args]
    result = run_cli("generate", "--model", str(exported_run / "export" / "mednist_gan.ts"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_generating_from_torchscript_does_not_import_monai(tmp_path):
    """The default model is the shipped TorchScript: generating from it skips MONAI's seconds-long import."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from mednist_gan.generator.generate import SHIPPED_MODEL, generate
        paths = generate(SHIPPED_MODEL, 3, Path({str(tmp_path / 'out')!r}))
        print(len(paths), "monai" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "False"]

