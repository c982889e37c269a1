"""A sweep trial's evaluation callback stopping a real training run."""

from __future__ import annotations

import pytest

from mednist_gan.config import load_config

from helpers import CONFIGS


def test_an_evaluation_callback_ends_the_run_after_the_next_iteration_and_its_checkpoint(debug_overrides, tmp_path):
    """The trainer's hook for a sweep's pruner: a reason returned by the callback ends the run cleanly."""
    from mednist_gan import checkpoint as ckpt
    from mednist_gan.training.stopping import EndedEarly
    from mednist_gan.training.trainer import Trainer

    cfg = load_config(CONFIGS / "debug.yaml", [*debug_overrides, "eval.every_steps=2", "eval.num_samples=8",
                                               "eval.keep_best=false", "checkpoint.every_steps=null"])
    seen = []

    def judge(step: int, result: dict):
        seen.append((step, sorted(result)))
        return "hopeless" if step == 2 else None

    with pytest.raises(EndedEarly, match=r"ended early at \S+step_000003: hopeless"):
        Trainer(cfg, on_evaluation=judge).fit()
    assert [step for step, _ in seen] == [2] and "eval/fmd" in seen[0][1]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step_000003"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "ending the run early, after a checkpoint: hopeless" in log and "training finished" not in log
    assert "epoch 0 step 3 " in log and "epoch 0 step 4 " not in log
