"""Real multi-process runs through ``accelerate launch`` (two gloo processes on CPU)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from mednist_gan import checkpoint as ckpt

from conftest import CONFIGS, REPO, train_cmd

pytestmark = pytest.mark.slow


def _launch(num_processes: int, *overrides: str) -> subprocess.CompletedProcess:
    cmd = train_cmd(num_processes)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*cmd, "--config", str(CONFIGS / "debug.yaml"), *overrides], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, mednist_root):
    """Same data and latents: 2 x half batch under DDP ends where 1 x full batch ends."""
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.augment=false",
              "model.d_dropout=0", "train.max_steps=3", "train.batch_size=16", "export.at_end=false",
              "train.deterministic=false"]
    one = _launch(1, *common, f"run_dir={tmp_path / 'one'}")
    two = _launch(2, *common, f"run_dir={tmp_path / 'two'}")
    assert "1 process(es)" in one.stdout and "2 process(es)" in two.stdout
    assert "(8 per process)" in two.stdout
    # Identical semantics: the logged losses of every step agree...
    assert _loss_lines(tmp_path / "one") == _loss_lines(tmp_path / "two")
    # ...and so do the trained generators' images. Weight by weight, Adam divides each gradient by its
    # own running RMS, so elements whose gradient is at round-off level (different summation order
    # across 2 processes) move by up to +-lr either way: bound the total difference relative to how
    # far training moved the weights instead.
    a = load_file(str(ckpt.find_latest(tmp_path / "one") / "model.safetensors"))
    b = load_file(str(ckpt.find_latest(tmp_path / "two") / "model.safetensors"))
    from accelerate.utils import set_seed

    from mednist_gan.config import ModelConfig
    from mednist_gan.networks import build_generator

    set_seed(0)
    initial = build_generator(ModelConfig()).state_dict()
    moved = sum(((a[k] - initial[k]) ** 2).sum() for k in a) ** 0.5
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    assert moved > 0.05 and apart / moved < 0.25, (apart, moved)
    g1, g2 = build_generator(ModelConfig(), init=False), build_generator(ModelConfig(), init=False)
    g1.load_state_dict(a), g2.load_state_dict(b)
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (g1(z) - g2(z)).abs().mean() < 2e-3


def test_one_iteration_of_two_processes_equals_one_process_allclose(tmp_path, mednist_root):
    """After one iteration (5 D updates, 1 G update) the weights agree element by element.

    Adam's first steps move every element by about lr * sign(gradient), however small the gradient:
    elements whose gradient is at round-off level (the two runs sum the batch in a different order)
    can move by up to 2 * lr per update in opposite directions. So: allclose for all but a sliver of
    elements, and no element further apart than those sign flips allow.
    """
    lr, d_steps = 2e-4, 5
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.augment=false",
              "model.d_dropout=0", "train.max_steps=1", "train.batch_size=16", "export.at_end=false",
              "train.deterministic=false"]
    _launch(1, *common, f"run_dir={tmp_path / 'one'}")
    _launch(2, *common, f"run_dir={tmp_path / 'two'}")
    total = mismatched = 0
    for name, updates in (("model.safetensors", 1), ("model_1.safetensors", d_steps)):
        a = load_file(str(ckpt.find_latest(tmp_path / "one") / name))
        b = load_file(str(ckpt.find_latest(tmp_path / "two") / name))
        for key in a:
            close = torch.isclose(a[key], b[key], rtol=1e-4, atol=1e-5)
            total += close.numel()
            mismatched += int((~close).sum())
            assert (a[key] - b[key]).abs().max() <= 2 * lr * updates * 1.01, f"{name}: {key}"
    assert mismatched / total < 0.01, (mismatched, total)


def _loss_lines(run) -> list[str]:
    lines = (run / "train.log").read_text().splitlines()
    return [line.split(" INFO ")[1].split(" images_per_s")[0] for line in lines if " loss_d=" in line]


def test_two_process_debug_run_trains_checkpoints_and_exports_once(tmp_path, mednist_root):
    run = tmp_path / "run"
    result = _launch(2, f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}")
    assert result.stdout.count("training finished at step 4") == 1  # rank 0 alone prints
    assert ckpt.find_latest(run).name == "step_000004"
    files = sorted(p.name for p in ckpt.find_latest(run).iterdir())
    assert "random_states_0.pkl" in files and "random_states_1.pkl" in files
    assert (run / "export" / "mednist_gan.ts").is_file()
    # Restarting the same command resumes and has nothing left to do.
    again = _launch(2, f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}")
    assert "resumed from" in again.stdout and "step 4" in again.stdout
