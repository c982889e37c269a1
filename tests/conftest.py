"""Shared fixtures: the real MedNIST images, small configs in a temporary run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED = REPO.parent / "shared"
MEDNIST_ROOT = Path(os.environ.get("MEDNIST_ROOT", SHARED / "data" / "mednist"))
UPSTREAM_WEIGHTS = Path(os.environ.get("MEDNIST_GAN_UPSTREAM", SHARED / "upstream" / "mednist_gan_bundle_model.pt"))


def _missing(reason: str):
    """Skip on a developer machine without the shared files; on CI (CI=true) they must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " - CI must provide it")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mednist_root() -> Path:
    if not (MEDNIST_ROOT / "Hand").is_dir():
        _missing(f"real MedNIST images not found at {MEDNIST_ROOT} (set MEDNIST_ROOT)")
    return MEDNIST_ROOT


@pytest.fixture(scope="session")
def upstream_weights() -> Path:
    if not UPSTREAM_WEIGHTS.is_file():
        _missing(f"seed bundle weights not found at {UPSTREAM_WEIGHTS} (set MEDNIST_GAN_UPSTREAM)")
    return UPSTREAM_WEIGHTS


@pytest.fixture()
def debug_overrides(tmp_path: Path, mednist_root: Path) -> list[str]:
    """Overrides that turn configs/debug.yaml into a tiny run on real images inside tmp_path."""
    return [f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path.parent / 'cache'}"]


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


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state; each new trainer in this process needs a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()
