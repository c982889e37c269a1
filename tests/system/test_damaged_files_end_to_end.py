"""Damaged checkpoints and exports met by whole runs and commands: resume from the newest intact checkpoint,
one line for what cannot be used, destinations that cannot be written (docs/reliability.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mednist_gan import checkpoint as ckpt
from mednist_gan.training.trainer import train

from helpers import CONFIGS, copy_run, cut, flip_one_byte, run_cli, run_config

UNWRITABLE = Path("/proc/mednist-gan-test/x")  # /proc refuses new entries, even to root


DAMAGE = {
    "model.safetensors cut to 100 bytes": lambda c: cut(c / "model.safetensors"),
    "optimizer.bin with one byte changed": lambda c: flip_one_byte(c / "optimizer.bin"),
    "latent_rng.pt missing": lambda c: (c / "latent_rng.pt").unlink(),
    "checkpoint.json garbage": lambda c: (c / ckpt.META).write_text("{not json"),
    "random_states_0.pkl empty": lambda c: (c / "random_states_0.pkl").write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(checkpointed_run, tmp_path, mednist_root,
                                                                       damage):
    run = copy_run(checkpointed_run, tmp_path / "run")
    newest = run / "checkpoints" / "step_000004"
    DAMAGE[damage](newest)
    trainer = train(run_config(run, mednist_root, tmp_path / "cache", "train.max_steps=6", "train.epochs=2"))
    assert trainer.state.step == 6
    log = (run / "train.log").read_text()
    assert "checkpoint step_000004 is damaged" in log and "resuming from" in log
    assert "resumed from " + str(run / "checkpoints" / "step_000002") in log
    aside = run / "checkpoints" / "damaged-step_000004"
    assert aside.is_dir(), "the damaged checkpoint is kept for a person to inspect"
    assert ckpt.find_latest(run).name == "step_000006"


def test_no_intact_checkpoint_is_one_line_and_nothing_is_moved(checkpointed_run, tmp_path, mednist_root):
    run = copy_run(checkpointed_run, tmp_path / "run")
    for step in ("step_000002", "step_000004"):
        cut(run / "checkpoints" / step / "model.safetensors")
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={run}", f"data.root={mednist_root}",
                     f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=6")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "no intact checkpoint (2 damaged, newest:" in result.stderr
    assert "step_000004/model.safetensors: 100 bytes" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000004"]


def test_export_and_generate_check_the_checkpoint_they_read(checkpointed_run, tmp_path):
    run = copy_run(checkpointed_run, tmp_path / "run")
    cut(run / "checkpoints" / "step_000004" / "model.safetensors")
    # A damaged checkpoint folder, named: one line.
    for args in (("export", "--checkpoint", str(run / "checkpoints" / "step_000004"), "--out", str(tmp_path / "e")),
                 ("generate", "--model", str(run / "checkpoints" / "step_000004"),
                  "--output-dir", str(tmp_path / "g"))):
        result = run_cli(*args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "step_000004/model.safetensors: 100 bytes" in result.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "g").exists()
    # The run directory: its newest intact checkpoint, said so, and nothing moved (a reader does not move files).
    result = run_cli("export", "--checkpoint", str(run), "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr
    assert ("skipping damaged checkpoint" in result.stderr
            and "using " + str(run / "checkpoints" / "step_000002") in result.stderr)
    assert json.loads((tmp_path / "e" / "export.json").read_text())["step"] == 2
    assert (run / "checkpoints" / "step_000004").is_dir()


@pytest.fixture(scope="module")
def exported(checkpointed_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "export"
    result = run_cli("export", "--checkpoint", str(checkpointed_run), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", ["model.pt", "mednist_gan.ts"])
def test_a_damaged_export_is_named_in_one_line(exported, tmp_path, name):
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    flip_one_byte(out / name)
    result = run_cli("generate", "--model", str(out / name), "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"{out / name}: damaged or replaced (its sha256 differs from the one in {out / 'export.json'})"
            in result.stderr)


def test_a_damaged_export_record_is_named_in_one_line(exported, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported, out)
    (out / "export.json").write_text("{cut sh")
    result = run_cli("generate", "--model", str(out / "model.pt"), "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{out / 'export.json'}: unreadable export" in result.stderr


@pytest.mark.parametrize("case", ["export --out", "generate --output-dir", "generate --grid", "evaluate --out",
                                  "train run_dir", "train-classifier --out"])
def test_an_unwritable_destination_is_one_line_naming_it(case, checkpointed_run, tmp_path, mednist_root):
    args = {
        "export --out": ("export", "--checkpoint", str(checkpointed_run), "--out", str(UNWRITABLE)),
        "generate --output-dir": ("generate", "--num-samples", "2", "--output-dir", str(UNWRITABLE)),
        "generate --grid": ("generate", "--num-samples", "2", "--output-dir", str(tmp_path / "g"),
                            "--grid", str(UNWRITABLE / "grid.png")),
        "evaluate --out": ("evaluate", "--model", str(checkpointed_run), "--out", str(UNWRITABLE / "e.json")),
        "train run_dir": ("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={UNWRITABLE}"),
        "train-classifier --out": ("train-classifier", "--data-root", str(mednist_root), "--out",
                                   str(UNWRITABLE / "c.pt")),
    }[case]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("mednist-gan: error: ") and "cannot be created or written" in result.stderr
    assert str(UNWRITABLE) in result.stderr
