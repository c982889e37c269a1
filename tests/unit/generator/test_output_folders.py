"""Commands never delete what they did not write: export folders are replaced only when they hold an earlier export,
the replacement survives a kill between any two filesystem steps, and a full disk is one line with nothing lost."""

from __future__ import annotations

import hashlib

import pytest

from mednist_gan.config import ModelConfig
from mednist_gan.errors import CheckpointError, OutputError
from mednist_gan.files import recover_folder
from mednist_gan.generator.export import export_generator
from mednist_gan.models.networks import build_generator

from helpers import assert_one_line_error, file_hashes, run_cli


@pytest.mark.parametrize("target", ["the run folder", "a user folder"])
def test_export_refuses_a_folder_that_is_not_an_earlier_export(exported_run, tmp_path, target):
    if target == "the run folder":
        out = exported_run
    else:
        out = tmp_path / "mine"
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "today.txt").write_text("do not delete")
        (out / "model.pt").write_bytes(b"my own model")  # one of export's names does not make it an export
    before = file_hashes(out)
    result = run_cli("export", "--checkpoint", str(exported_run), "--out", str(out))
    assert_one_line_error(result, f"--out {out}: exists and is not an earlier export", "nothing was written")
    assert file_hashes(out) == before


def test_an_export_renamed_aside_by_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "exp"
    aside = tmp_path / f".exp.old-{__import__('socket').gethostname()}-1"  # pid 1 is alive
    aside.mkdir()
    recover_folder(out)
    assert aside.is_dir() and not out.exists()


def test_export_generator_names_the_folder_it_refuses(tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "mine.txt").write_text("x")
    cfg = ModelConfig()
    with pytest.raises(OutputError, match=r"^export folder .*best: exists and is not an earlier export"):
        export_generator(build_generator(cfg), cfg, tmp_path / "best", {})
    assert file_hashes(tmp_path / "best") == {"mine.txt": hashlib.sha256(b"x").hexdigest()}


def test_a_generator_that_returns_nan_is_not_exported(tmp_path):
    import torch

    cfg = ModelConfig()
    generator = build_generator(cfg)
    with torch.no_grad():
        next(generator.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match=r"export folder .*exp: not exported: the generator returns non-finite"):
        export_generator(generator, cfg, tmp_path / "exp", {})
    assert list(tmp_path.iterdir()) == []
