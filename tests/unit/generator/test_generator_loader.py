"""``open_generator``: every format a command takes opens through it, and each checkpoint is verified once per
command (generate, export, sweep-report's export of the best trial)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import Config, ModelConfig
from mednist_gan.errors import CheckpointError
from mednist_gan.generator.export import export_checkpoint
from mednist_gan.generator.generate import generate
from mednist_gan.generator.loader import (CHECKPOINT, EXPORTED_PROGRAM, TORCHSCRIPT, WEIGHTS, OpenedGenerator,
                                          open_generator)
from mednist_gan.models.networks import build_generator

CLASSES = ["CXR", "Hand"]
MODEL = ModelConfig(arch="resnet", latent_size=16, resnet_g_channels=2, resnet_d_channels=2, classes=CLASSES)


def _checkpoint(run: Path, step: int, generator: torch.nn.Module) -> Path:
    """A complete checkpoint of ``run`` holding only what loading the generator reads (weights, metadata)."""
    config = dataclasses.asdict(Config())
    config["model"] = dataclasses.asdict(MODEL)
    tmp = ckpt.begin_save(run, step)
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {"state": dataclasses.asdict(ckpt.TrainState(step=step)), "config": config, "num_processes": 1,
            "git_revision": None}
    return ckpt.publish(run, tmp, step, meta, keep=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with two checkpoints (the newer one is the generator below) and an export of the newer."""
    run = tmp_path_factory.mktemp("loader") / "run"
    torch.manual_seed(0)
    _checkpoint(run, 2, build_generator(MODEL).eval())
    _checkpoint(run, 4, build_generator(MODEL).eval())
    export_checkpoint(run, run / "export")
    return run


@pytest.fixture()
def verified(monkeypatch) -> tuple[Counter, Counter]:
    """Counts of ``checkpoint.verify`` calls per checkpoint folder and of sha256 computations per file."""
    verifies, hashes = Counter(), Counter()
    verify, sha256_file = ckpt.verify, ckpt.sha256_file

    def counting_verify(checkpoint):
        verifies[Path(checkpoint)] += 1
        return verify(checkpoint)

    def counting_sha256(path):
        hashes[Path(path)] += 1
        return sha256_file(path)

    monkeypatch.setattr(ckpt, "verify", counting_verify)
    monkeypatch.setattr(ckpt, "sha256_file", counting_sha256)
    return verifies, hashes


def _expected_images(run: Path, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    generator = build_generator(MODEL, init=False)
    generator.load_state_dict(load_file(str(ckpt.find_latest(run) / "model.safetensors")))
    with torch.no_grad():
        return generator.eval()(latents, labels)


def test_every_format_opens_through_open_generator(run):
    newest = ckpt.find_latest(run)
    export = run / "export"
    record = json.loads((export / "export.json").read_text())
    latents, labels = torch.randn(3, 16), torch.tensor([0, 1, 1])
    expected = _expected_images(run, latents, labels)
    cases = [(run, CHECKPOINT, newest), (newest, CHECKPOINT, newest), (export, TORCHSCRIPT, export / "mednist_gan.ts"),
             (export / "model.pt", WEIGHTS, export / "model.pt"),
             (export / "mednist_gan.pt2", EXPORTED_PROGRAM, export / "mednist_gan.pt2"),
             (export / "mednist_gan.ts", TORCHSCRIPT, export / "mednist_gan.ts")]
    for given, kind, source in cases:
        opened = open_generator(given)
        assert isinstance(opened, OpenedGenerator) and (opened.kind, opened.source) == (kind, source), given
        assert opened.latent_size == 16 and opened.classes == CLASSES and opened.label("Hand") == 1, given
        if kind == CHECKPOINT:
            assert opened.record["state"]["step"] == 4 and opened.model_config == MODEL
        else:
            assert opened.record == record
            assert opened.model_config == (MODEL if kind == WEIGHTS else None)
        with torch.no_grad():
            assert torch.allclose(opened.network(latents, labels), expected, atol=1e-5), given


def test_generate_and_export_verify_each_checkpoint_once(run, tmp_path, verified):
    verifies, hashes = verified
    newest = ckpt.find_latest(run)
    files = sorted(p for p in newest.iterdir() if p.name != ckpt.META)
    for command in (lambda: generate(run, 2, tmp_path / "png", class_name="all"),
                    lambda: export_checkpoint(run, tmp_path / "export"),
                    lambda: generate(newest, 2, tmp_path / "png", class_name="Hand"),
                    lambda: export_checkpoint(newest, tmp_path / "export")):
        verifies.clear()
        hashes.clear()
        command()
        assert verifies == {newest: 1}
        assert {path: hashes[path] for path in files} == {path: 1 for path in files}


def test_an_exported_file_is_hashed_once_per_generate(run, tmp_path, verified):
    verifies, hashes = verified
    for name in ("model.pt", "mednist_gan.pt2", "mednist_gan.ts"):
        hashes.clear()
        generate(run / "export" / name, 2, tmp_path / name, class_name="CXR")
        assert hashes == {run / "export" / name: 1} and not verifies, name


def test_sweep_report_exports_the_best_trial_verifying_its_checkpoint_once(run, tmp_path, verified):
    import shutil

    from mednist_gan.sweep.report import export_best
    from mednist_gan.sweep.spec import TRIALS_DIR

    trial = tmp_path / "sweep" / TRIALS_DIR / "trial_0003"
    shutil.copytree(run / "checkpoints", trial / "checkpoints")
    best = SimpleNamespace(number=3, params={"optim.lr_g": 1e-3}, value=0.5, user_attrs={"scores": {"fmd": 0.5}})
    study = SimpleNamespace(study_name="tiny", best_trial=best, get_trials=lambda deepcopy, states: [best])
    verifies, _ = verified
    out = export_best(study, {"objective": {"metric": "fmd", "direction": "minimize"}}, tmp_path / "sweep",
                      tmp_path / "best")
    assert verifies == {trial / "checkpoints" / "step_000004": 1}
    provenance = json.loads((out / "export.json").read_text())
    assert provenance["step"] == 4 and provenance["sweep"]["trial"] == 3 and provenance["classes"] == CLASSES


def test_export_takes_training_checkpoints_only(run, tmp_path):
    for given in (run / "export", run / "export" / "mednist_gan.ts", tmp_path / "absent"):
        with pytest.raises(CheckpointError, match=f"^{given}: not a complete checkpoint \\(no checkpoint.json\\)$"):
            export_checkpoint(given, tmp_path / "out")


def test_an_export_folder_without_a_generator_file_is_one_line(tmp_path):
    (tmp_path / "export.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match="an export folder without a generator file"):
        open_generator(tmp_path)
