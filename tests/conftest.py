"""Shared fixtures (the real MedNIST images, small configs and trained runs) and the tiers: tests/system/ is slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import MEDNIST_ROOT, UPSTREAM_WEIGHTS, reset_accelerate, run_config, train_debug_run

SYSTEM_TESTS = Path(__file__).parent / "system"


def pytest_collection_modifyitems(items):
    """The folder decides the tier: every test under tests/system/ is slow, every other test is fast."""
    for item in items:
        if SYSTEM_TESTS in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, mednist_root) -> Path:
    """A debug run with complete checkpoints at steps 2 and 4 and no export (a test works on a copy of it)."""
    from mednist_gan import checkpoint as ckpt
    from mednist_gan.training.trainer import train

    run = tmp_path_factory.mktemp("checkpointed") / "run"
    train(run_config(run, mednist_root, run.parent / "cache"))
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step_000002", "step_000004"]
    reset_accelerate()
    return run


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, mednist_root) -> Path:
    """A finished debug run with its export (a test that changes it works on a copy)."""
    return train_debug_run(tmp_path_factory.mktemp("exported") / "run", mednist_root)


@pytest.fixture(scope="module")
def hand_halves(mednist_root):
    """Two disjoint sets of 1,000 real Hand images, scaled as training scales them (the sanity checks' N)."""
    from mednist_gan.quality.evaluate import load_real_images, split_halves

    return split_halves(load_real_images(mednist_root / "Hand"), 1000, seed=0)


@pytest.fixture(scope="module")
def hand_meter(hand_halves):
    """A QualityMeter whose real images are the first of ``hand_halves``."""
    from mednist_gan.quality.scores import QualityMeter

    return QualityMeter(hand_halves[0])


@pytest.fixture(scope="module")
def classifier_split(mednist_root):
    """The shipped classifier's split (seed 0, 10% held out): its test images are unseen by it."""
    from mednist_gan.quality.classifier import load_split

    return load_split(mednist_root, 0.1, 0)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()
