"""Export and generate as processes end to end: the MONAI bundle, ONNX, export replacing an earlier one, killed
exports and a full disk (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from monai.networks.nets import Generator
from PIL import Image

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import ModelConfig
from mednist_gan.files import recover_folder
from mednist_gan.generator.export import export_checkpoint, export_generator
from mednist_gan.models.networks import build_generator

from helpers import BUNDLE_ARGS, REPO, assert_one_line_error, file_hashes, run_cli, tmpfs

# A process that exports over an earlier export and dies (os._exit, no cleanup) at the k-th filesystem step.
KILLED_EXPORT = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    import mednist_gan.files as files
    from mednist_gan.config import ModelConfig
    from mednist_gan.generator.export import export_generator
    from mednist_gan.models.networks import build_generator

    step, kill_at = 0, int(sys.argv[2])
    def dying(real):
        def call(*args, **kwargs):
            global step
            step += 1
            if step == kill_at:
                os._exit(137)
            return real(*args, **kwargs)
        return call
    files.os.rename = dying(os.rename)          # old export aside, new one in
    files.shutil.rmtree = dying(shutil.rmtree)  # old export removed
    Path.write_bytes = dying(Path.write_bytes)  # the new files, one by one
    cfg = ModelConfig()
    export_generator(build_generator(cfg), cfg, Path(sys.argv[1]), {"config": {"model": {}}})
""")


def test_monai_bundle_run_inferring_writes_pngs(exported_run, tmp_path):
    bundle = exported_run / "export" / "bundle"
    out = tmp_path / "outputs"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json",
         "--meta_file", "configs/metadata.json", "--bundle_root", ".", "--output_dir", str(out), "--num_samples", "3"],
        cwd=bundle, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    assert Image.open(pngs[0]).size == (64, 64)


def test_export_command_from_a_checkpoint(exported_run, tmp_path):
    latest = ckpt.find_latest(exported_run)
    result = run_cli("export", "--checkpoint", str(latest), "--out", str(tmp_path / "exp"))
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"model.pt", "mednist_gan.pt2", "mednist_gan.ts",
                                                              "export.json", "bundle"}
    # Exporting again over it replaces it atomically and leaves no temporary folders behind.
    export_checkpoint(latest, tmp_path / "exp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    # The run directory stands for its newest checkpoint; one without a checkpoint is a one-line error.
    result = run_cli("export", "--checkpoint", str(exported_run), "--out", str(tmp_path / "from_run"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "from_run" / "export.json").read_text())["checkpoint"] == str(latest.resolve())
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    result = run_cli("export", "--checkpoint", str(tmp_path / "empty_run"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "a run directory without a complete checkpoint" in result.stderr


@pytest.mark.parametrize("make_file", ["jpeg", "optimizer", "truncated"])
def test_generate_refuses_files_that_are_not_generators(exported_run, tmp_path, mednist_root, make_file):
    if make_file == "jpeg":
        model = mednist_root / "Hand" / "000000.jpeg"
    elif make_file == "optimizer":
        model = ckpt.find_latest(exported_run) / "optimizer.bin"
    else:
        data = (exported_run / "export" / "model.pt").read_bytes()
        model = tmp_path / "model.pt"
        model.write_bytes(data[: len(data) // 2])
    result = run_cli("generate", "--model", str(model), "--output-dir", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert str(model) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_onnx_export_through_the_dynamo_exporter_equals_the_eager_generator(exported_run, tmp_path):
    """``export --onnx``: one self-contained file from the torch.export-based exporter (onnxscript), any batch
    size, equal in onnxruntime to the eager generator; the command prints nothing but its result line."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    result = run_cli("export", "--checkpoint", str(exported_run), "--out", str(tmp_path / "exp"), "--onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and result.stdout.strip() == f"exported to {tmp_path / 'exp'}"
    out = tmp_path / "exp"
    record = json.loads((out / "export.json").read_text())
    assert "mednist_gan.onnx" in record["files"]
    assert not list(out.glob("*.data"))  # weights inside the .onnx file, not beside it
    onnx.checker.check_model(onnx.load(str(out / "mednist_gan.onnx")), full_check=True)
    session = ort.InferenceSession(str(out / "mednist_gan.onnx"))
    net = Generator(**BUNDLE_ARGS)
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    for n in (1, 7):
        z = torch.randn(n, 64, generator=torch.Generator().manual_seed(n))
        onnx_images = session.run(None, {"latents": z.numpy()})[0]
        with torch.no_grad():
            eager = torch.sigmoid(net.eval()(z)).numpy()
        assert onnx_images.shape == (n, 1, 64, 64)
        assert np.abs(onnx_images - eager).max() < 1e-5, n


def test_export_replaces_an_earlier_export_and_an_empty_folder(exported_run, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "exp", tmp_path / "exp"):
        result = run_cli("export", "--checkpoint", str(exported_run), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "export.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exp"]  # no staging or old folders left


@pytest.mark.parametrize("kill_at, survivor", [(2, "old"), (4, "old"), (5, "old"), (6, "new"), (7, "new")],
                         ids=["writing a file", "before the renames", "between the renames", "before removing the old",
                              "after"])
def test_an_export_killed_between_any_two_steps_leaves_the_old_or_the_new_one(tmp_path, kill_at, survivor):
    cfg = ModelConfig()
    out = tmp_path / "exp"
    export_generator(build_generator(cfg), cfg, out, {"config": {"model": {}}, "which": "old"})
    old = file_hashes(out)
    result = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(out), str(kill_at)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == (137 if kill_at < 7 else 0), result.stderr
    recover_folder(out)  # what the next export, or a training run before reading best/, does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    record = json.loads((out / "export.json").read_text())
    if survivor == "old":
        assert file_hashes(out) == old
    else:
        assert record.get("which") is None and file_hashes(out) != old
        for name, entry in record["files"].items():  # complete: every file as its record says
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]


@pytest.fixture()
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for one export of the bundle's generator, not for a second beside it."""
    with tmpfs(tmp_path / "disk", "6m") as mount:
        yield mount


def test_a_full_disk_during_export_is_one_line_and_the_earlier_export_stays(exported_run, small_disk):
    out = small_disk / "exp"
    assert run_cli("export", "--checkpoint", str(exported_run), "--out", str(out)).returncode == 0
    before = file_hashes(out)
    result = run_cli("export", "--checkpoint", str(exported_run), "--out", str(out))
    assert_one_line_error(result, f"--out {out}: cannot be created or written (No space left on device)")
    assert file_hashes(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["exp"]


def test_a_conditional_generator_exports_to_a_monai_bundle_and_onnx(tmp_path):
    """A class-conditional generator's MONAI bundle runs with `monai.bundle run` for a chosen class; its ONNX
    (dynamo exporter) takes 'latents' and 'labels', any batch size, equal in onnxruntime to the eager generator."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import dataclasses

    from mednist_gan.config import ModelConfig
    from mednist_gan.generator.export import export_generator
    from mednist_gan.models.networks import build_generator

    cfg = ModelConfig(arch="resnet", latent_size=16, resnet_g_channels=2, resnet_d_channels=2, classes=["CXR", "Hand"])
    torch.manual_seed(0)
    G = build_generator(cfg).eval()
    for module in G.modules():
        if isinstance(module, torch.nn.Embedding):  # zero at the start: give the labels an effect
            torch.nn.init.normal_(module.weight)
    out = export_generator(G, cfg, tmp_path / "export", {"config": {"model": dataclasses.asdict(cfg)}}, onnx=True)
    # The MONAI bundle folder runs the TorchScript file with MONAI alone, for the class --class_index names.
    bundle = out / "bundle"
    pngs = tmp_path / "bundle_out"
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inferring",
                           "--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json",
                           "--bundle_root", ".", "--output_dir", str(pngs), "--num_samples", "2", "--class_index", "1"],
                          cwd=bundle, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = sorted(pngs.glob("*.png"))
    assert len(written) == 2 and np.asarray(Image.open(written[0])).shape == (64, 64)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["label"]["channel_def"] == {"0": "CXR", "1": "Hand"}
    session = ort.InferenceSession(str(out / "mednist_gan.onnx"))
    assert [i.name for i in session.get_inputs()] == ["latents", "labels"]
    for n in (1, 5):
        z, labels = torch.randn(n, 16), torch.arange(n) % 2
        with torch.no_grad():
            eager = G(z, labels).numpy()
        got = session.run(None, {"latents": z.numpy(), "labels": labels.numpy()})[0]
        assert got.shape == (n, 1, 64, 64) and np.abs(got - eager).max() < 1e-5, n
