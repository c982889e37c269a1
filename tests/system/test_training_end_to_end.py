"""Whole training runs on real images: bitwise resume, rotation, EMA and schedules, bf16, the residual and
conditional models, and runs written by mednist-gan 0.1.0."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mednist_gan import checkpoint as ckpt
from mednist_gan.config import load_config
from mednist_gan.errors import CheckpointError
from mednist_gan.generator.loader import open_generator
from mednist_gan.training.optim import lr_factor
from mednist_gan.training.trainer import Trainer, train

from helpers import (CONFIGS, TINY_RESNET, TWO_CLASSES, V0_1_0_RUN, checkpoint_weights, debug_config,
                     forget_file_records, reset_accelerate, run_cli, small_trainer)

# The tiny architecture the fixture was trained with (tests/fixtures/README.md).
TINY_0_1_0 = ["model.latent_size=8", "model.start_shape=[8,8,8]", "model.g_channels=[4,4,4,1]",
        "model.d_channels=[2,2,2,2,1]", "train.ema_decay=0.9", "data.limit=16", "train.batch_size=8"]


def test_a_0_1_0_checkpoint_resumes_and_exports(tmp_path, mednist_root):
    run = tmp_path / "run"
    shutil.copytree(V0_1_0_RUN, run)
    cfg = load_config(CONFIGS / "debug.yaml", [f"run_dir={run}", f"data.root={mednist_root}",
                                               f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4",
                                               "train.epochs=2", *TINY_0_1_0])
    trainer = train(cfg)
    assert trainer.state.step == 4
    assert "resumed from " + str(run / "checkpoints" / "step_000002") in (run / "train.log").read_text()
    assert ckpt.find_latest(run).name == "step_000004" and (run / "export" / "mednist_gan.ts").is_file()
    result = run_cli("export", "--checkpoint", str(V0_1_0_RUN / "checkpoints" / "step_000002"),
                     "--out", str(tmp_path / "e"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["model.pt", "mednist_gan.ts"])
def test_a_0_1_0_export_generates(tmp_path, name):
    result = run_cli("generate", "--model", str(V0_1_0_RUN / "export" / name), "--num-samples", "3",
                     "--output-dir", str(tmp_path / "g"))
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "g").glob("*.png"))) == 3


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch and at an epoch boundary
def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path, mednist_root, stop_at):
    """N steps, stop, resume to 2N == 2N straight (CPU, deterministic): weights equal bit for bit."""
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.limit=32",
              "train.batch_size=8", "train.epochs=3", "export.at_end=false", "checkpoint.every_steps=null"]
    straight = tmp_path / "straight"
    train(load_config(CONFIGS / "debug.yaml", [*common, f"run_dir={straight}", f"train.max_steps={2 * stop_at}"]))
    resumed = tmp_path / "resumed"
    train(load_config(CONFIGS / "debug.yaml", [*common, f"run_dir={resumed}", f"train.max_steps={stop_at}"]))
    trainer = train(load_config(CONFIGS / "debug.yaml",
                                [*common, f"run_dir={resumed}", f"train.max_steps={2 * stop_at}"]))
    assert "resumed from" in (resumed / "train.log").read_text()
    assert trainer.state.step == 2 * stop_at
    a, b = checkpoint_weights(ckpt.find_latest(straight)), checkpoint_weights(ckpt.find_latest(resumed))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa = torch.load(ckpt.find_latest(straight) / name, weights_only=True)["state"]
        sb = torch.load(ckpt.find_latest(resumed) / name, weights_only=True)["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_resume_with_ada_continues_its_probability_exactly(tmp_path, mednist_root):
    """ADA stopped between two adjustments (step 6 of intervals of 4) and resumed moves p and trains as one run."""
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.limit=16",
              "train.batch_size=8", "train.epochs=12", "export.at_end=false", "checkpoint.every_steps=null",
              "train.d_augment=ada", "train.ada_images=64", "train.d_train_steps=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = train(load_config(CONFIGS / "debug.yaml", [*common, f"run_dir={straight}", "train.max_steps=12"]))
    train(load_config(CONFIGS / "debug.yaml", [*common, f"run_dir={resumed}", "train.max_steps=6"]))
    assert ckpt.read_meta(ckpt.find_latest(resumed))["state"]["ada_count"] == 2  # mid-interval
    second = train(load_config(CONFIGS / "debug.yaml", [*common, f"run_dir={resumed}", "train.max_steps=12"]))
    assert second.gan_step.ada.p == first.gan_step.ada.p > 0
    a, b = checkpoint_weights(ckpt.find_latest(straight)), checkpoint_weights(ckpt.find_latest(resumed))
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows = [[json.loads(line)["augment_p"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (straight, resumed)]
    assert rows[0] == rows[1]


def test_checkpoint_from_before_the_augmentation_stream_still_resumes(debug_overrides, tmp_path):
    """Checkpoints written before augmentation had its own generator (no augment_rng.pt) resume, and say so."""
    train(debug_config(debug_overrides, "export.at_end=false", "train.max_steps=2"))
    latest = ckpt.find_latest(tmp_path / "run")
    (latest / "augment_rng.pt").unlink()
    forget_file_records(latest)  # such checkpoints recorded no sizes and checksums either
    trainer = train(debug_config(debug_overrides, "export.at_end=false"))
    assert trainer.state.step == 4
    assert "no augment_rng.pt); the stream starts again from the seed" in (tmp_path / "run" / "train.log").read_text()


def test_checkpoint_rotation_keeps_newest_k(debug_overrides, tmp_path):
    train(debug_config(debug_overrides, "train.epochs=2", "train.max_steps=5", "checkpoint.every_steps=1",
                       "checkpoint.keep=2", "export.at_end=false"))
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "run")] == ["step_000004", "step_000005"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000005"


def test_resume_with_a_different_architecture_names_the_key(debug_overrides):
    train(debug_config(debug_overrides, "train.max_steps=2", "export.at_end=false"))
    with pytest.raises(CheckpointError, match=r"trained with model.g_channels=\[32, 16, 8, 1\]"):
        Trainer(debug_config(debug_overrides, "model.g_channels=[16, 16, 8, 1]")).fit()


def test_bf16_autocast_trains_on_cpu(debug_overrides):
    trainer = train(debug_config(debug_overrides, "train.precision=bf16", "train.max_steps=2", "export.at_end=false",
                                 "train.deterministic=false"))
    assert trainer.state.step == 2


def test_a_launcher_asking_for_another_precision_is_warned_about(tmp_path, mednist_root):
    """`accelerate launch --mixed_precision bf16` (or its config file) with train.precision=no: a warning, not a
    silent override; train.precision wins."""
    result = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={tmp_path / 'run'}",
                     f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1",
                     "export.at_end=false", env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert result.returncode == 0, result.stderr
    assert "the launcher asks for mixed precision 'bf16'" in result.stdout and "using 'no'" in result.stdout
    assert "precision no" in result.stdout  # the run line: train.precision was used
    agreeing = run_cli("train", "--config", str(CONFIGS / "debug.yaml"), f"run_dir={tmp_path / 'run2'}",
                       f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=1",
                       "export.at_end=false", env={"ACCELERATE_MIXED_PRECISION": "no"})
    assert agreeing.returncode == 0 and "the launcher asks" not in agreeing.stdout


def test_ema_equals_the_formula_and_is_exported(tmp_path, mednist_root):
    decay, steps = 0.8, 3
    trainer = small_trainer(tmp_path, mednist_root, f"train.ema_decay={decay}", f"train.max_steps={steps}",
                            "train.epochs=5", "train.d_train_steps=1")
    G = trainer.acc.unwrap_model(trainer.G)
    history = [[p.detach().clone() for p in G.parameters()]]
    step = trainer.opt_g.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        history.append([p.detach().clone() for p in G.parameters()])
        return out

    trainer.opt_g.step = recording_step
    trainer.fit()
    trainer.export(tmp_path / "export")
    trainer.tracking.finish()
    assert len(history) == steps + 1
    # ema_K = decay^K w_0 + sum_k (1 - decay) decay^(K - k) w_k
    for i, ema in enumerate(trainer.ema.parameters()):
        expected = decay ** steps * history[0][i] + sum(
            (1 - decay) * decay ** (steps - k) * history[k][i] for k in range(1, steps + 1))
        assert torch.allclose(ema, expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(ema, history[-1][i])  # and it is not the raw weights
    exported = open_generator(tmp_path / "export" / "model.pt").network
    for (name, value), mine in zip(exported.state_dict().items(), trainer.ema.state_dict().values()):
        assert torch.equal(value, mine), name
    # The checkpoint keeps the average, and `generate`/`export` from the checkpoint use it.
    saved = load_file(str(trainer.final_checkpoint / "ema.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in trainer.ema.state_dict().items())
    assert "moving average" in json.loads((tmp_path / "export" / "export.json").read_text())["weights"]


def test_ema_warmup_uses_the_ramped_decay(tmp_path, mednist_root):
    decay, steps = 0.99, 3
    trainer = small_trainer(tmp_path, mednist_root, f"train.ema_decay={decay}", "train.ema_warmup=true",
                            f"train.max_steps={steps}", "train.epochs=5", "train.d_train_steps=1",
                            "export.at_end=false")
    G = trainer.acc.unwrap_model(trainer.G)
    expected = [p.detach().clone() for p in G.parameters()]
    step = trainer.opt_g.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        t = len(recorded)
        d = min(decay, (1 + t) / (10 + t))  # 0.1, 0.1818..., 0.25: far below 0.99 early on
        for e, p in zip(expected, G.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        recorded.append(d)
        return out

    recorded: list = []
    trainer.opt_g.step = recording_step
    trainer.fit()
    trainer.tracking.finish()
    assert recorded == pytest.approx([0.1, 2 / 11, 0.25])
    for ema, want in zip(trainer.ema.parameters(), expected):
        assert torch.allclose(ema, want, rtol=1e-5, atol=1e-7)


def test_scheduled_learning_rate_is_what_the_optimizers_use(tmp_path, mednist_root):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=4", "log.every_steps=1", "optim.warmup_steps=2", "optim.decay=linear",
        "optim.final_lr_ratio=0.5", "log.sample_every=null", "export.at_end=false"])
    train(cfg)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr_g"] for row in logged if "lr_g" in row]
    factor = lr_factor(cfg.optim, 4)
    assert lrs == pytest.approx([cfg.optim.g_lr * factor(s) for s in range(4)])
    assert lrs == pytest.approx([1e-4, 2e-4, 2e-4, 1e-4])


def test_resume_with_ema_and_schedule_is_bitwise(tmp_path, mednist_root):
    """Stopped after 2 of 4 iterations and resumed == 4 iterations straight: weights, EMA, learning rates."""
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "train.ema_decay=0.9",
              "train.r1_gamma=1", "train.loss=hinge", "optim.warmup_steps=3", "optim.decay=cosine",
              "train.max_steps=4", "log.sample_every=null", "export.at_end=false"]
    straight = train(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'a'}", *common]))
    reset_accelerate()
    interrupted = Trainer(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'b'}", *common]))
    interrupted.stop.requested = lambda acc: interrupted.state.step >= 2  # as if preempted after iteration 2
    interrupted.fit()
    interrupted.tracking.finish()
    assert interrupted.state.step == 2
    reset_accelerate()
    resumed = train(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'b'}", *common]))
    assert resumed.state.step == straight.state.step == 4
    assert resumed.gan_step.lr_used == straight.gan_step.lr_used
    for (k, a), b in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), k
    G_a, G_b = (t.acc.unwrap_model(t.G).state_dict() for t in (straight, resumed))
    assert all(torch.equal(G_a[k], G_b[k]) for k in G_a)


def test_resume_into_ema_from_a_run_without_it_is_refused(tmp_path, mednist_root):
    from mednist_gan.errors import CheckpointError

    common = [f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
              "log.sample_every=null", "export.at_end=false"]
    train(load_config(CONFIGS / "debug.yaml", [*common, "train.max_steps=2"]))
    reset_accelerate()
    with pytest.raises(CheckpointError, match="has no ema.safetensors, but the config sets train.ema_decay"):
        train(load_config(CONFIGS / "debug.yaml", [*common, "train.ema_decay=0.9"]))


def test_conditional_resume_is_bitwise(tmp_path, mednist_root):
    common = [f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.limit=16",
              "train.batch_size=8", TWO_CLASSES, *TINY_RESNET, "train.max_steps=4", "train.ema_decay=0.9",
              "export.at_end=false"]
    straight = train(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'a'}", *common]))
    reset_accelerate()
    interrupted = Trainer(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'b'}", *common]))
    interrupted.stop.requested = lambda acc: interrupted.state.step >= 2
    interrupted.fit()
    interrupted.tracking.finish()
    reset_accelerate()
    resumed = train(load_config(CONFIGS / "debug.yaml", [f"run_dir={tmp_path / 'b'}", *common]))
    for a, b in ((straight.ema, resumed.ema),
                 (straight.acc.unwrap_model(straight.D), resumed.acc.unwrap_model(resumed.D))):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
