"""Helpers shared by the tests (imported as ``from helpers import ...``; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
MEDNIST_ROOT = Path(os.environ.get("MEDNIST_ROOT", SHARED / "data" / "mednist"))
UPSTREAM_WEIGHTS = Path(os.environ.get("MEDNIST_GAN_UPSTREAM", SHARED / "upstream" / "mednist_gan_bundle_model.pt"))
V0_1_0_RUN = REPO / "tests" / "fixtures" / "v0.1.0_run"  # written by mednist-gan 0.1.0 (fixtures/README.md)



def train_cmd(num_processes: int = 1) -> list[str]:
    """The command that starts ``mednist_gan.train`` with this many processes, as users start it."""
    if num_processes == 1:
        return [sys.executable, "-m", "mednist_gan.train"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "-m", "mednist_gan.train"]


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 600):
    """Run ``python -m mednist_gan ...`` in a fresh process and return the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mednist_gan", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


_WITHOUT = """
import importlib.machinery, sys

hidden = set(sys.argv[1].split(","))

class Hide(importlib.machinery.PathFinder):  # as if the hidden packages were not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] in hidden else super().find_spec(name, path, target)

sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from mednist_gan.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_main(*args: str):
    """``mednist-gan ...`` in this process (no interpreter to start, torch already imported): the exit code and
    what it printed, as ``run_cli`` returns them. For commands that fail or finish early."""
    import contextlib
    import io
    from types import SimpleNamespace

    from mednist_gan.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_cli_without(packages: tuple[str, ...], *args: str, timeout: int = 600):
    """``run_cli`` as on a machine without ``packages`` (an extra not installed)."""
    import subprocess

    return subprocess.run([sys.executable, "-c", _WITHOUT, ",".join(packages), *args], cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)


def train_debug_run(run: Path, mednist_root: Path) -> Path:
    """Train configs/debug.yaml into ``run`` on the real images (decoded-image cache beside it); returns ``run``."""
    from mednist_gan.config import load_config
    from mednist_gan.training.trainer import train

    train(load_config(CONFIGS / "debug.yaml", [f"run_dir={run}", f"data.root={mednist_root}",
                                               f"data.cache_dir={run.parent / 'cache'}"]))
    reset_accelerate()
    return run


def run_overrides(run: Path, mednist_root: Path, cache: Path, *extra: str) -> list[str]:
    """configs/debug.yaml's overrides for a run in ``run`` on the real images that checkpoints but does not export."""
    return [f"run_dir={run}", f"data.root={mednist_root}", f"data.cache_dir={cache}", "export.at_end=false", *extra]


def run_config(run: Path, mednist_root: Path, cache: Path, *extra: str):
    """configs/debug.yaml with :func:`run_overrides`."""
    from mednist_gan.config import load_config

    return load_config(CONFIGS / "debug.yaml", run_overrides(run, mednist_root, cache, *extra))


def copy_run(run: Path, target: Path) -> Path:
    """A copy of a run folder at ``target``, for a test that damages or resumes it."""
    import shutil

    shutil.copytree(run, target)
    return target


def file_hashes(folder: Path, *, folders: bool = False) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), and with ``folders`` every folder: what a user
    would lose if a command changed it."""
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if folders or p.is_file()}


def assert_one_line_error(result, *fragments: str) -> None:
    """A command that failed with exit 2 and one ``mednist-gan: error:`` line holding each fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mednist-gan: error:") and "Traceback" not in result.stderr, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def cut(path: Path, size: int = 100) -> None:
    """Cut a file short, as a writer killed mid-write leaves it."""
    path.write_bytes(path.read_bytes()[:size])


def flip_one_byte(path: Path) -> None:
    """Flip the middle byte of a file, as a bad disk or a stray write leaves it."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def offline_wandb_runs(run_dir: Path) -> list[Path]:
    """The offline W&B runs a training run in ``run_dir`` left."""
    return sorted((run_dir / "tracker" / "wandb").glob("offline-run-*"))


# Two MedNIST classes on a tiny residual model: the conditional tests' smallest run.
TWO_CLASSES = "data.classes=[CXR, Hand]"
TINY_RESNET = ["model.arch=resnet", "model.resnet_g_channels=2", "model.resnet_d_channels=2", "model.latent_size=16"]


# The seed bundle's Generator (configs/bundle.yaml's model), as MONAI's class takes it.
BUNDLE_ARGS = dict(latent_shape=64, start_shape=[64, 8, 8], channels=[32, 16, 8, 1], strides=[2, 2, 2, 1])


def debug_config(overrides: list[str], *extra: str):
    """configs/debug.yaml with these overrides (e.g. the ``debug_overrides`` fixture) and more."""
    from mednist_gan.config import load_config

    return load_config(CONFIGS / "debug.yaml", [*overrides, *extra])


def small_trainer(tmp_path: Path, mednist_root: Path, *overrides: str):
    """A ``Trainer`` for configs/debug.yaml on 16 real images, batch 8, without sample grids."""
    from mednist_gan.training.trainer import Trainer

    return Trainer(debug_config([f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}",
                                 f"data.cache_dir={tmp_path / 'cache'}", "data.limit=16", "train.batch_size=8",
                                 "log.sample_every=null"], *overrides))


def checkpoint_weights(checkpoint: Path) -> dict:
    """G's and D's tensors of a training checkpoint, as ``G.<name>`` and ``D.<name>``."""
    from safetensors.torch import load_file

    return {**{f"G.{k}": v for k, v in load_file(str(checkpoint / "model.safetensors")).items()},
            **{f"D.{k}": v for k, v in load_file(str(checkpoint / "model_1.safetensors")).items()}}


def per_class(images, labels, n: int, skip: int = 0):
    """``n`` images of every MedNIST class (after skipping ``skip`` of each), with their labels."""
    import torch

    from mednist_gan.quality.classifier import CLASSES

    index = torch.cat([(labels == c).nonzero().flatten()[skip:skip + n] for c in range(len(CLASSES))])
    return images[index], labels[index]


@contextmanager
def tmpfs(mount: Path, size: str):
    """A tmpfs of ``size`` (e.g. "6m") mounted at ``mount``: a disk that fills up (skipped without root; CI has it)."""
    import subprocess

    import pytest

    mount.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI runs as root and must be able to mount a small tmpfs")
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def sample_hands(size: int, count: int = 40):
    """(name, uint8 array) for ``count`` of the shipped sample's hands scaled up to ``size`` x ``size`` (bicubic):
    images of another size than MedNIST's, for the tests of other resolutions and of your own images."""
    import numpy as np
    from PIL import Image

    for path in sorted((REPO / "mednist_gan" / "sample_data" / "Hand").iterdir())[:count]:
        with Image.open(path) as image:
            yield path.stem, np.asarray(image.convert("L").resize((size, size), Image.BICUBIC))


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state; each new trainer in this process needs a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def adam_max_step(lr: float, betas: tuple[float, float], t: int) -> float:
    """The most torch.optim.Adam (no weight decay) can move one element at its t-th step, whatever the gradients.

    The step is lr * m_hat / (sqrt(v_hat) + eps) with m_hat = sum(w_i g_i), v_hat = sum(u_i g_i^2) (weights of
    the bias-corrected averages); by Cauchy-Schwarz |m_hat| / sqrt(v_hat) <= sqrt(sum(w_i^2 / u_i)): 1 at t = 1.
    """
    b1, b2 = betas
    w = [(1 - b1) * b1 ** (t - i) / (1 - b1 ** t) for i in range(1, t + 1)]
    u = [(1 - b2) * b2 ** (t - i) / (1 - b2 ** t) for i in range(1, t + 1)]
    return lr * sum(x * x / y for x, y in zip(w, u)) ** 0.5


def assert_close_up_to_adam_round_off(a: dict, b: dict, *, lr: float, betas: tuple[float, float], updates: int,
                                      rtol: float = 1e-4, atol: float = 1e-5, max_share: float = 0.01,
                                      what: str = "") -> None:
    """Two state dicts that the same ``updates`` Adam steps produced from the same start, up to round-off.

    Adam divides each gradient by its own running RMS, so an element whose gradient is at round-off level
    (a different kernel, summation order or CPU) moves by up to a full step either way, however small the
    difference that decided its sign. So: allclose for all but ``max_share`` of the elements, and no element
    further apart than two such trajectories can end (twice Adam's largest possible move over ``updates``).
    A real semantic difference (another batch, other latents, a missing update) moves most elements apart.
    """
    import torch

    # 1.001: float32 rounding of the step itself.
    bound = 2 * sum(adam_max_step(lr, betas, t) for t in range(1, updates + 1)) * 1.001
    total = mismatched = 0
    assert a.keys() == b.keys(), f"{what}: different parameters"
    for key in a:
        p, q = a[key].double(), b[key].double()
        close = torch.isclose(p, q, rtol=rtol, atol=atol)
        total += close.numel()
        mismatched += int((~close).sum())
        worst = float((p - q).abs().max()) if p.numel() else 0.0
        assert worst <= bound, f"{what}.{key}: an element {worst:.3g} apart, more than Adam can move it ({bound:.3g})"
    assert mismatched <= max_share * total, f"{what}: {mismatched} of {total} elements not allclose (> {max_share:.1%})"


def forget_file_records(checkpoint: Path) -> None:
    """Make a checkpoint look like one written before sizes and checksums were recorded in its metadata."""
    import json

    from mednist_gan.checkpoint import META

    meta = json.loads((checkpoint / META).read_text())
    del meta["files"]
    (checkpoint / META).write_text(json.dumps(meta))


def main_process_tracking(run_dir: Path):
    """``Tracking`` for the debug config in ``run_dir``, as the main process builds it, without an Accelerator."""
    import logging
    from types import SimpleNamespace

    from mednist_gan.config import load_config
    from mednist_gan.training.tracking import Tracking

    cfg = load_config(CONFIGS / "debug.yaml", [f"run_dir={run_dir}"])
    return Tracking(cfg, SimpleNamespace(is_main_process=True), run_dir, logging.getLogger("mednist_gan"))
