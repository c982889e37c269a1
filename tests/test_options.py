"""Training options beyond the bundle's recipe: each changes exactly what it claims to change."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mednist_gan.config import load_config
from mednist_gan.generator.loader import open_generator
from mednist_gan.models.losses import discriminator_loss, generator_loss, r1_penalty
from mednist_gan.training.optim import lr_factor
from mednist_gan.training.trainer import Trainer, train

from helpers import CONFIGS, reset_accelerate

REAL = torch.tensor([[0.5], [-1.0], [2.5]])
FAKE = torch.tensor([[2.0], [0.3], [-4.0]])


def test_loss_variants_closed_form():
    sig = torch.sigmoid
    bce_d = (-torch.log(sig(REAL)).mean() - torch.log(1 - sig(FAKE)).mean()) / 2
    assert torch.allclose(discriminator_loss(REAL, FAKE, "bce"), bce_d, atol=1e-6)
    assert torch.allclose(discriminator_loss(REAL, FAKE, "ns"), 2 * bce_d, atol=1e-6)
    hinge_d = torch.clamp(1 - REAL, min=0).mean() + torch.clamp(1 + FAKE, min=0).mean()
    assert torch.allclose(discriminator_loss(REAL, FAKE, "hinge"), hinge_d)
    assert torch.allclose(generator_loss(FAKE, "bce"), -torch.log(sig(FAKE)).mean(), atol=1e-6)
    assert torch.allclose(generator_loss(FAKE, "ns"), -torch.log(sig(FAKE)).mean(), atol=1e-6)
    assert torch.allclose(generator_loss(FAKE, "hinge"), -FAKE.mean())
    with pytest.raises(ValueError, match="unknown loss"):
        discriminator_loss(REAL, FAKE, "wasserstein")


def test_r1_penalty_of_a_linear_critic():
    """D(x) = <w, x> + b has grad_x D = w for every image: the penalty is |w|^2 and its gradient 2w."""
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    x = torch.rand(5, 1, 4, 4, requires_grad=True)
    penalty = r1_penalty(D(x), x)
    w = D[1].weight.detach()
    assert torch.allclose(penalty, w.square().sum(), rtol=1e-5)
    penalty.backward()
    assert torch.allclose(D[1].weight.grad, 2 * w, rtol=1e-5)
    assert D[1].bias.grad is None or torch.count_nonzero(D[1].bias.grad) == 0


def _trainer(tmp_path, mednist_root, *overrides):
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
        "data.limit=16", "train.batch_size=8", "log.sample_every=null", *overrides])
    return Trainer(cfg)


def _record_grads(optimizer, into: list):
    step = optimizer.step

    def recording_step(*args, **kwargs):
        into.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        return step(*args, **kwargs)

    optimizer.step = recording_step


@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_r1_adds_its_gradient_to_the_discriminator_update(tmp_path, mednist_root, gamma):
    trainer = _trainer(tmp_path, mednist_root, "train.loss=ns", f"train.r1_gamma={gamma}", "train.d_train_steps=1",
                       "model.d_dropout=0", "data.augment=false")
    D = trainer.acc.unwrap_model(trainer.D)
    G = trainer.acc.unwrap_model(trainer.G)
    real = trainer.gan_step.prepare_reals(next(iter(trainer.loader)))
    rng_state = trainer.gan_step.latent_rng.get_state()
    d_params = [p.detach().clone() for p in D.parameters()]
    g_state = {k: v.clone() for k, v in G.state_dict().items()}
    grads: list = []
    _record_grads(trainer.opt_d, grads)
    trainer.gan_step.run(real, step=trainer.state.step)

    # The same update by hand: the loss on the same images, plus gamma/2 * |grad_x D(x)|^2.
    trainer.gan_step.latent_rng.set_state(rng_state)
    with torch.no_grad():
        for p, p0 in zip(D.parameters(), d_params):
            p.copy_(p0)
        G.load_state_dict(g_state)  # the generator update that followed is undone too
        fake = G(trainer.gan_step.sample_latents(trainer.per_device_batch))
    x = real.detach().clone().requires_grad_(True)
    real_logits = D(x)
    loss = discriminator_loss(real_logits, D(fake), "ns")
    penalty = r1_penalty(real_logits, x)
    expected = torch.autograd.grad(loss + gamma / 2 * penalty, list(D.parameters()), retain_graph=True)
    without = torch.autograd.grad(loss, list(D.parameters()))
    for got, want, plain in zip(grads[0], expected, without):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    changed = any(not torch.allclose(w, p, rtol=1e-4, atol=1e-6) for w, p in zip(expected, without))
    assert changed == (gamma > 0)  # R1 really changes the update, and only when it is on


@pytest.mark.slow
def test_ema_equals_the_formula_and_is_exported(tmp_path, mednist_root):
    decay, steps = 0.8, 3
    trainer = _trainer(tmp_path, mednist_root, f"train.ema_decay={decay}", f"train.max_steps={steps}", "train.epochs=5",
                       "train.d_train_steps=1")
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


@pytest.mark.slow
def test_ema_warmup_uses_the_ramped_decay(tmp_path, mednist_root):
    decay, steps = 0.99, 3
    trainer = _trainer(tmp_path, mednist_root, f"train.ema_decay={decay}", "train.ema_warmup=true",
                       f"train.max_steps={steps}", "train.epochs=5", "train.d_train_steps=1", "export.at_end=false")
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


def test_update_ratio_and_phase_batch_sizes(tmp_path, mednist_root):
    trainer = _trainer(tmp_path, mednist_root, "train.d_train_steps=3", "train.g_train_steps=2",
                       "train.g_batch_size=4")
    G = trainer.acc.unwrap_model(trainer.G)
    G_batches, d_steps, g_steps = [], [], []
    G.register_forward_hook(lambda m, inputs, out: G_batches.append(inputs[0].shape[0]))
    _record_grads(trainer.opt_d, d_steps)
    _record_grads(trainer.opt_g, g_steps)
    metrics = trainer.gan_step.run(trainer.gan_step.prepare_reals(next(iter(trainer.loader))), step=trainer.state.step)
    assert G_batches == [8, 4, 4]  # one fake batch for the D phase, then two fresh latent batches of 4
    assert (len(d_steps), len(g_steps)) == (3, 2)
    assert math.isfinite(metrics["loss_g"].item())


def test_learning_rate_schedules():
    from mednist_gan.config import OptimConfig

    warm = lr_factor(OptimConfig(warmup_steps=4), 100)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    linear = lr_factor(OptimConfig(warmup_steps=2, decay="linear", final_lr_ratio=0.1), 12)
    assert linear(1) == 1.0 and linear(2) == 1.0 and abs(linear(11) - 0.1) < 1e-12
    assert abs(linear(7) - (1 - 0.9 * 5 / 9)) < 1e-12
    cosine = lr_factor(OptimConfig(decay="cosine"), 11)
    assert cosine(0) == 1.0 and abs(cosine(5) - 0.5) < 1e-12 and abs(cosine(10)) < 1e-12


@pytest.mark.slow
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


def test_bundle_recipe_keeps_every_option_off():
    cfg = load_config(CONFIGS / "bundle.yaml")
    t = cfg.train
    assert (t.loss, t.r1_gamma, t.ema_decay, t.g_train_steps, t.g_batch_size) == ("bce", 0.0, None, 1, None)
    assert not cfg.optim.scheduled and cfg.eval.every_steps is None and cfg.eval.every_epochs is None


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_into_ema_from_a_run_without_it_is_refused(tmp_path, mednist_root):
    from mednist_gan.errors import CheckpointError

    common = [f"run_dir={tmp_path / 'run'}", f"data.root={mednist_root}", f"data.cache_dir={tmp_path / 'cache'}",
              "log.sample_every=null", "export.at_end=false"]
    train(load_config(CONFIGS / "debug.yaml", [*common, "train.max_steps=2"]))
    reset_accelerate()
    with pytest.raises(CheckpointError, match="has no ema.safetensors, but the config sets train.ema_decay"):
        train(load_config(CONFIGS / "debug.yaml", [*common, "train.ema_decay=0.9"]))


def test_a_checkpoint_does_not_carry_the_saving_runs_optimizer_implementation():
    """load_state_dict puts back the saved param groups; the run's own choices (capturable for CUDA graphs, fused
    on a GPU, foreach) and a capturable optimizer's learning-rate tensor come back after it (optim.keep_run_options).
    (A capturable or fused step needs a GPU: tests/test_gpu.py resumes an eager checkpoint into captured phases.)"""
    from mednist_gan.training.optim import keep_run_options

    net = torch.nn.Linear(3, 2)
    saved = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=False)  # as an eager CPU run saves it: lr a float
    net(torch.ones(1, 3)).sum().backward()
    saved.step()
    resumed = torch.optim.Adam(net.parameters(), lr=torch.tensor(2e-3), capturable=True, foreach=True)
    resumed.load_state_dict(saved.state_dict())
    group = resumed.param_groups[0]
    assert (group["capturable"], group["foreach"], group["lr"]) == (False, False, 1e-3)  # what the checkpoint said
    keep_run_options(resumed, torch.device("cpu"))
    assert group["capturable"] and group["foreach"] and not group.get("fused")
    # the saved rate, as a tensor
    assert isinstance(group["lr"], torch.Tensor) and float(group["lr"]) == pytest.approx(1e-3)
    assert resumed.state[next(iter(net.parameters()))]["step"] == 1  # the state itself is the checkpoint's
    # A non-capturable optimizer keeps a float learning rate.
    plain = torch.optim.Adam(net.parameters(), lr=5e-4)
    plain.load_state_dict(saved.state_dict())
    keep_run_options(plain, torch.device("cpu"))
    assert plain.param_groups[0]["lr"] == 1e-3 and not plain.param_groups[0]["foreach"]
