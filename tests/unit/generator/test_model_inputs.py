"""Generators and options given to ``generate`` and ``evaluate``: pickled code in a .pt2, non-finite output,
out-of-range options, class names that are no folder names, and destinations that cannot be written."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch

from mednist_gan import cli
from mednist_gan.generator.generate import SHIPPED_MODEL

REFUSED = "refused, it holds pickled objects other than tensors"


class TinyGenerator(torch.nn.Module):
    """Latents (N, 4) -> images (N, 1, 64, 64) in [0, 1]; with ``nan``, NaN images."""

    def __init__(self, nan: bool = False):
        super().__init__()
        self.nan = nan
        self.lin = torch.nn.Linear(4, 64 * 64)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = torch.sigmoid(self.lin(latents)).reshape(-1, 1, 64, 64)
        return images * float("nan") if self.nan else images


class TinyConditional(torch.nn.Module):
    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(latents), 1, 64, 64)


def _mednist_gan(capsys, *args: str) -> tuple[int, list[str]]:
    """``mednist-gan ARGS`` in this process: the exit code and the lines on stderr."""
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _program(path: Path) -> Path:
    program = torch.export.export(TinyGenerator().eval().requires_grad_(False), (torch.randn(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    return path


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _with_pickled_code(good: Path, bad: Path, entry: str, marker: Path) -> Path:
    """``good`` with code pickled where ``torch.export.load`` unpickles without weights_only: the sample inputs
    (loaded so after the safe load fails), or a weight the weights config marks as pickled."""
    code = io.BytesIO()
    torch.save(_Exploit(marker), code)
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if entry == "sample_inputs" and info.filename.endswith("data/sample_inputs/model.pt"):
                data = code.getvalue()
            if entry == "weights" and info.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                config["config"]["lin.weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            if entry == "weights" and info.filename.endswith("data/weights/weight_0"):
                data = code.getvalue()
            zout.writestr(info, data)
    return bad


@pytest.mark.parametrize("entry", ["sample_inputs", "weights"])
def test_pt2_with_pickled_code_is_refused_and_nothing_runs(tmp_path, capsys, entry):
    marker = tmp_path / "pwned"
    bad = _with_pickled_code(_program(tmp_path / "good.pt2"), tmp_path / "bad.pt2", entry, marker)
    out = tmp_path / "e.json"
    for args in (["generate", "--model", bad, "--output-dir", tmp_path / "png"],
                 ["evaluate", "--model", bad, "--num-samples", "10", "--out", out],
                 ["evaluate", "--model", SHIPPED_MODEL, "--baseline", bad, "--num-samples", "10", "--out", out]):
        code, err = _mednist_gan(capsys, *args)
        assert code == 2 and len(err) == 1, (args, err)
        assert err[0].startswith(f"mednist-gan: error: {bad}: {REFUSED}") and "data/" in err[0], err
        assert not marker.exists()
    assert not out.exists() and not list((tmp_path / "png").glob("*.png"))


def test_pt2_files_without_pickled_code_still_load(tmp_path):
    """The layout torch.export.save writes (raw weights, sample inputs pickled with tensors only), for a
    foreign program and for the project's class-conditional export."""
    from mednist_gan.config import ModelConfig
    from mednist_gan.generator.export import write_exported_program
    from mednist_gan.generator.loader import open_generator
    from mednist_gan.models.networks import build_generator

    opened = open_generator(_program(tmp_path / "tiny.pt2"))
    net, size = opened.network, opened.latent_size
    assert size == 4 and net(torch.randn(3, 4)).shape == (3, 1, 64, 64)
    cfg = ModelConfig(arch="resnet", classes=["Hand", "CXR"])
    write_exported_program(build_generator(cfg), tmp_path / "mednist_gan.pt2", cfg.latent_size)
    opened = open_generator(tmp_path / "mednist_gan.pt2")
    net, size = opened.network, opened.latent_size
    assert net(torch.randn(3, size), torch.tensor([0, 1, 1])).shape == (3, 1, 64, 64)


def _nan_weights(tmp_path: Path) -> Path:
    """A model.pt of the seed bundle's architecture with one weight NaN."""
    from mednist_gan.config import ModelConfig
    from mednist_gan.models.networks import build_generator

    state = build_generator(ModelConfig()).state_dict()
    state[next(k for k in state if k.endswith("weight"))].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "model.pt")
    return tmp_path / "model.pt"


def test_generator_returning_nan_is_one_line_in_generate_and_evaluate(tmp_path, capsys):
    model = _nan_weights(tmp_path)
    code, err = _mednist_gan(capsys, "generate", "--model", model, "--num-samples", "4",
                             "--output-dir", tmp_path / "png")
    assert code == 2 and len(err) == 1, err
    assert f"--model {model}: the generator returned non-finite values (NaN/Inf) for " in err[0]
    assert not list((tmp_path / "png").glob("*.png"))
    code, err = _mednist_gan(capsys, "evaluate", "--model", model, "--num-samples", "10", "--out", tmp_path / "e.json")
    assert code == 2 and len(err) == 1 and "returned non-finite values (NaN/Inf)" in err[0], err
    assert not (tmp_path / "e.json").exists()


def test_foreign_generator_returning_nan_is_refused(tmp_path):
    from mednist_gan.errors import MednistGanError
    from mednist_gan.generator.generate import generate

    ts = tmp_path / "nan.ts"
    torch.jit.script(TinyGenerator(nan=True).eval()).save(str(ts))
    with pytest.raises(MednistGanError, match=r"for 8192 of 8192 pixels of 2 images"):
        generate(ts, 2, tmp_path / "png", latent_size=4)


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "1000000000"], "--num-samples 1000000000: expected at most 10,000,000 (for more, run again "
                                      "with another --seed and --output-dir)"),
    (["--seed", "100000000000000000000"], "--seed 100000000000000000000: expected an integer from 0 to 2**63 - 1"),
    (["--seed", "-1"], "--seed -1: expected an integer from 0 to 2**63 - 1"),
    (["--device", "gpu0"], "--device gpu0: expected cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is visible; use --device cpu"),
    (["--device", "cuda:1"], "--device cuda:1: no CUDA GPU is visible; use --device cpu"),
])
def test_generate_options_are_checked_before_any_work(tmp_path, capsys, args, message):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    start = time.monotonic()
    code, err = _mednist_gan(capsys, "generate", "--model", tmp_path / "absent.ts", "--output-dir", tmp_path / "o",
                             *args)
    assert code == 2 and err == [f"mednist-gan: error: {message}"]  # before the (missing) model is looked at
    assert time.monotonic() - start < 5 and not (tmp_path / "o").exists()


def test_evaluate_seed_out_of_range_is_one_line(tmp_path, capsys):
    code, err = _mednist_gan(capsys, "evaluate", "--model", tmp_path / "absent.ts", "--seed", str(2**63),
                             "--out", tmp_path / "e.json")
    assert code == 2 and err == [f"mednist-gan: error: --seed {2**63}: expected an integer from 0 to 2**63 - 1"]


def test_class_names_that_are_not_plain_folder_names_are_refused(tmp_path, capsys):
    export = tmp_path / "export"
    export.mkdir()
    torch.jit.script(TinyConditional()).save(str(export / "generator.ts"))
    (export / "export.json").write_text(json.dumps({"files": {}, "classes": ["../evil", "Hand"]}))
    out = tmp_path / "out" / "inside"
    code, err = _mednist_gan(capsys, "generate", "--model", export / "generator.ts", "--class", "all",
                             "--latent-size", "4", "--num-samples", "2", "--output-dir", out)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"mednist-gan: error: {export / 'export.json'}: class name '../evil' is not allowed: "
                             "expected a plain folder name")
    assert not (tmp_path / "out" / "evil").exists() and not list(tmp_path.rglob("*.png"))


def test_evaluate_out_that_is_a_folder_fails_before_scoring(tmp_path, capsys, monkeypatch):
    import mednist_gan.quality.evaluate

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored before checking --out")

    monkeypatch.setattr(mednist_gan.quality.evaluate, "evaluate", must_not_score)
    code, err = _mednist_gan(capsys, "evaluate", "--model", SHIPPED_MODEL, "--out", tmp_path)
    assert code == 2 and err == [f"mednist-gan: error: --out {tmp_path}: is a folder; "
                                 "expected the path of the JSON file to write"]


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root only; skipped elsewhere, required on CI)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root and must be able to mount a small tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def _noise_generator(tmp_path: Path) -> Path:
    """A TorchScript generator of noise: PNGs that do not compress (4 KiB each)."""
    ts = tmp_path / "noise.ts"
    torch.jit.script(TinyGenerator().eval()).save(str(ts))
    return ts


@pytest.mark.parametrize("where", ["--output-dir", "--grid"])
def test_generate_on_a_full_disk_is_one_line(tmp_path, capsys, full_disk, where):
    model = _noise_generator(tmp_path)
    out = full_disk / "png" if where == "--output-dir" else tmp_path / "png"  # 64 PNGs of noise: 260 KiB
    grid = full_disk / "grid.png" if where == "--grid" else tmp_path / "grid.png"
    code, err = _mednist_gan(capsys, "generate", "--model", model, "--latent-size", "4", "--num-samples", "64",
                             "--output-dir", out, "--grid", grid)
    assert code == 2 and len(err) == 1, err
    path = out if where == "--output-dir" else grid
    assert err[0] == f"mednist-gan: error: {where} {path}: cannot be created or written (No space left on device)"


def test_generate_stops_at_the_first_failed_write(tmp_path, capsys, monkeypatch):
    import mednist_gan.generator.generate

    calls = []

    def no_space(picture, path):
        calls.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(mednist_gan.generator.generate, "save_png", no_space)
    model = _noise_generator(tmp_path)
    code, err = _mednist_gan(capsys, "generate", "--model", model, "--latent-size", "4", "--num-samples", "10000",
                             "--batch-size", "10", "--output-dir", tmp_path / "png")
    assert code == 2 and err == [f"mednist-gan: error: --output-dir {tmp_path / 'png'}: cannot be created or written "
                                 "(No space left on device)"]
    assert len(calls) < 300  # not all 1,000 batches generated and handed to the writers first


def test_evaluate_json_on_a_full_disk_is_one_line_and_leaves_no_file(full_disk):
    from mednist_gan.errors import OutputError
    from mednist_gan.quality.evaluate import write_json

    with pytest.raises(OutputError, match=r"--out .*e\.json: cannot be created or written \(No space left on device\)"):
        write_json({"rows": ["x" * 1000] * 200}, full_disk / "e.json")
    assert list(full_disk.iterdir()) == []


def test_a_full_disk_anywhere_else_is_still_one_line(monkeypatch, capsys):
    """The command line's last guard: an ENOSPC from a write path that did not expect one is one line, exit 2."""
    import errno

    from mednist_gan import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/sweep.yaml")

    monkeypatch.setitem(cli.COMMANDS, "config-help", full)
    assert cli.main(["config-help"]) == 2
    assert capsys.readouterr().err == ("mednist-gan: error: /runs/x/sweep.yaml: cannot be written "
                                       "(No space left on device)\n")
