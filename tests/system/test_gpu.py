"""The GPU step: phases replayed as CUDA graphs equal the eager phases, and an iteration never waits on the host.

These need a CUDA GPU (CUDA graphs, fused Adam and TF32 exist only there); elsewhere they are skipped with
that reason. ``benchmarks/gpu_check.sh`` runs this file on a GPU machine; CI has none. CUDA graphs are used
with one process only (see ``runtime.graph_capture``), so there is no two-process variant here.
"""

from __future__ import annotations

import pytest
import torch

from mednist_gan.config import load_config
from mednist_gan.runtime.accelerator import graph_capture
from mednist_gan.training.trainer import Trainer

from helpers import CONFIGS, assert_close_up_to_adam_round_off, reset_accelerate

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs, fused Adam, TF32)")

STEPS = 10


def _config(tmp_path, mednist_root, *overrides):
    # Dropout off: a graph draws its masks from other offsets of the default generator than eager code does.
    # Deterministic kernels (debug.yaml): run to run, cuDNN's weight gradients differ by round-off otherwise,
    # and a GAN's ten steps grow that past any tolerance that would still catch a missing update.
    return load_config(CONFIGS / "debug.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.limit=320", "train.batch_size=32", f"train.max_steps={STEPS}", "train.d_train_steps=3",
        "model.d_dropout=0", "runtime.tf32=false", "log.sample_every=null", *overrides])


def _run(cfg, steps: int = STEPS, eager: bool = False):
    """``steps`` iterations as ``fit`` runs them (``eager``: with the same settings, but no phase captured);
    the per-step metrics and weights (one flat vector per step), the final weights by name, and the trainer."""
    trainer = Trainer(cfg)
    trainer.gan_step.graphs.enabled &= not eager
    batches, metrics, trajectory = iter(trainer.loader), [], []
    for _ in range(steps):
        step_metrics = trainer.gan_step.run(trainer.gan_step.prepare_reals(next(batches)), step=trainer.state.step)
        metrics.append({k: v.item() for k, v in step_metrics.items()})
        trainer.state.step += 1
        trajectory.append(torch.cat([p.detach().float().flatten()
                                     for p in (*trainer.G.parameters(), *trainer.D.parameters())]))
    nets = {"G": trainer.acc.unwrap_model(trainer.G), "D": trainer.acc.unwrap_model(trainer.D)}
    if trainer.ema is not None:
        nets["EMA"] = trainer.ema
    weights = {f"{name}.{k}": v.detach().float().cpu().clone() for name, net in nets.items()
               for k, v in net.state_dict().items()}
    reset_accelerate()
    return metrics, trajectory, weights, trainer


@cuda
@pytest.mark.parametrize("options", [
    [],
    ["train.r1_gamma=2.0", "train.loss=ns"],
    ["train.r1_gamma=2.0", "train.r1_every=2"],  # lazy R1: two patterns of updates, two discriminator graphs
    ["train.ema_decay=0.9", "train.ema_warmup=true", "optim.warmup_steps=4", "optim.decay=cosine"],
    ["train.precision=bf16", "train.g_train_steps=2"],
    ["train.mode_seeking=1"],  # the generator phase returns a second metric
], ids=["bundle", "r1", "lazy-r1", "ema-schedule", "bf16", "mode-seeking"])
def test_captured_phases_equal_eager_phases(tmp_path, mednist_root, options):
    cfg = _config(tmp_path, mednist_root, *options)
    eager_metrics, eager_path, eager_weights, _ = _run(cfg, eager=True)
    graph_metrics, graph_path, graph_weights, trainer = _run(cfg)
    apart = ", ".join(f"{(a - b).abs().max().item():.2g}" for a, b in zip(eager_path, graph_path))
    graphs = trainer.gan_step.graphs
    assert graphs.graphs and set(graphs.graphs) == set(graphs.calls), (
        f"captured {list(graphs.graphs)} of {list(graphs.calls)}")
    assert all(graphs.calls[key] >= graphs.warmup + 2 for key in graphs.graphs), "a graph was never replayed"
    bf16 = "train.precision=bf16" in options
    rel, tol = (3e-2, {"rtol": 2e-2, "atol": 2e-3}) if bf16 else (1e-3, {})
    for step, (a, b) in enumerate(zip(eager_metrics, graph_metrics)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=rel / 10), (
                f"step {step} {key}; weights apart by step: {apart}")
    t = cfg.train
    for net, updates, lr in (("G", STEPS * t.g_train_steps, cfg.optim.g_lr),
                             ("D", STEPS * t.d_train_steps, cfg.optim.d_lr),
                             ("EMA", STEPS * t.g_train_steps, cfg.optim.g_lr)):
        pick = lambda weights: {k: v for k, v in weights.items() if k.startswith(net + ".")}  # noqa: E731
        if pick(eager_weights):
            assert_close_up_to_adam_round_off(pick(eager_weights), pick(graph_weights), lr=lr,
                                              betas=tuple(cfg.optim.betas), updates=updates,
                                              what=f"{net} (weights apart by step: {apart})", **tol)
    # The replayed updates did change the weights (a graph that replays nothing would also 'agree' with itself).
    fresh = _run(cfg, steps=0)[2]
    assert any(not torch.allclose(fresh[k], v) for k, v in graph_weights.items() if k.startswith("G."))


@cuda
@pytest.mark.parametrize("graphs", ["true", "false"])
def test_an_iteration_never_waits_for_the_device(tmp_path, mednist_root, graphs):
    """From index batch to the EMA update, nothing inside an iteration synchronises the host with the GPU."""
    cfg = _config(tmp_path, mednist_root, f"runtime.cuda_graphs={graphs}", "train.r1_gamma=1.0",
                  "train.ema_decay=0.99", "optim.warmup_steps=10", "model.d_dropout=0.25")
    trainer = Trainer(cfg)
    batches = iter(trainer.loader)
    for _ in range(trainer.gan_step.graphs.warmup + 1):  # eager warm-up runs and the capture may synchronise
        trainer.gan_step.run(trainer.gan_step.prepare_reals(next(batches)), step=trainer.state.step)
        trainer.state.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.gan_step.run(trainer.gan_step.prepare_reals(next(batches)), step=trainer.state.step)
            trainer.state.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_the_gpu_path_uses_fused_capturable_adam_and_device_images(tmp_path, mednist_root):
    trainer = Trainer(_config(tmp_path, mednist_root))
    group = trainer.opt_d.optimizer.param_groups[0]
    assert group["fused"] and group["capturable"] and isinstance(group["lr"], torch.Tensor)
    assert trainer.gan_step.device_images.is_cuda and trainer.gan_step.device_images.dtype == torch.uint8
    assert torch.backends.cudnn.allow_tf32 is False  # runtime.tf32=false


def test_graph_capture_is_used_only_where_it_can_be(tmp_path, mednist_root):
    """On one GPU by default; never on CPU; eagerly, with the reason, where a setting needs the host every step."""
    cuda_device, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = _config(tmp_path, mednist_root)
    assert graph_capture(cfg, cuda_device, 1) == (True, None)
    assert graph_capture(cfg, cpu, 1) == (False, None)
    assert graph_capture(_config(tmp_path, mednist_root, "runtime.cuda_graphs=false"), cuda_device, 1) == (False, None)
    for override, words in (("train.precision=fp16", "train.precision=fp16"),
                            ("train.nonfinite=skip", "nonfinite=skip"),
                            ("train.detect_anomaly=true", "detect_anomaly")):
        used, reason = graph_capture(_config(tmp_path, mednist_root, override), cuda_device, 1)
        assert not used and words in reason and reason.startswith("runtime.cuda_graphs:")
    used, reason = graph_capture(cfg, cuda_device, 2)
    assert not used and "2 processes" in reason


@cuda
def test_resume_into_captured_phases_continues_the_schedule(tmp_path, mednist_root):
    """A checkpoint of an eager run (learning rates saved as floats) resumes into captured phases: the learning
    rates become device tensors again, so the cosine schedule goes on, and the weights match an uninterrupted run."""
    from mednist_gan.training.trainer import train

    common = ["optim.warmup_steps=3", "optim.decay=cosine", "optim.final_lr_ratio=0.5", "train.ema_decay=0.9",
              "checkpoint.every_steps=5", "export.at_end=false", "log.every_steps=5"]
    straight = train(_config(tmp_path / "straight", mednist_root, *common))
    reset_accelerate()
    interrupted = Trainer(_config(tmp_path / "resumed", mednist_root, *common, "runtime.cuda_graphs=false"))
    interrupted.stop.requested = lambda acc: interrupted.state.step >= 5  # as if preempted after iteration 5
    interrupted.fit()
    interrupted.tracking.finish()
    assert isinstance(interrupted.opt_g.param_groups[0]["lr"], float)  # an eager run saves floats
    reset_accelerate()
    resumed = train(_config(tmp_path / "resumed", mednist_root, *common))
    assert resumed.state.step == straight.state.step == STEPS
    for trainer in (straight, resumed):
        lr, scheduler = trainer.opt_g.param_groups[0]["lr"], trainer.schedulers[0]
        assert isinstance(lr, torch.Tensor) and lr.is_cuda
        assert float(lr) == pytest.approx(trainer.cfg.optim.g_lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                                          rel=1e-5)
        assert float(lr) < trainer.cfg.optim.g_lr
        assert trainer.gan_step.graphs.graphs, "no phase was captured"
    cfg = straight.cfg
    for name, a, b, updates, lr in (
            ("G", straight.acc.unwrap_model(straight.G), resumed.acc.unwrap_model(resumed.G), STEPS, cfg.optim.g_lr),
            ("D", straight.acc.unwrap_model(straight.D), resumed.acc.unwrap_model(resumed.D), STEPS * 3,
             cfg.optim.d_lr),
            ("EMA", straight.ema, resumed.ema, STEPS, cfg.optim.g_lr)):
        assert_close_up_to_adam_round_off({k: v.float().cpu() for k, v in a.state_dict().items()},
                                          {k: v.float().cpu() for k, v in b.state_dict().items()},
                                          lr=lr, betas=tuple(cfg.optim.betas), updates=updates, what=name)
