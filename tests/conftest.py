"""Shared fixtures: the real MedNIST images, small configs in a temporary run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import MEDNIST_ROOT, UPSTREAM_WEIGHTS, reset_accelerate


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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()
