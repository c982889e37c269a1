"""Training options beyond the bundle's recipe: each changes exactly what it claims to change."""

from __future__ import annotations

import math

import pytest
import torch

from mednist_gan.config import load_config
from mednist_gan.models.losses import discriminator_loss, generator_loss, r1_penalty
from mednist_gan.training.optim import lr_factor

from helpers import CONFIGS, small_trainer

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


def _record_grads(optimizer, into: list):
    step = optimizer.step

    def recording_step(*args, **kwargs):
        into.append([p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        return step(*args, **kwargs)

    optimizer.step = recording_step


@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_r1_adds_its_gradient_to_the_discriminator_update(tmp_path, mednist_root, gamma):
    trainer = small_trainer(tmp_path, mednist_root, "train.loss=ns", f"train.r1_gamma={gamma}", "train.d_train_steps=1",
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


def test_update_ratio_and_phase_batch_sizes(tmp_path, mednist_root):
    trainer = small_trainer(tmp_path, mednist_root, "train.d_train_steps=3", "train.g_train_steps=2",
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


def test_bundle_recipe_keeps_every_option_off():
    cfg = load_config(CONFIGS / "bundle.yaml")
    t = cfg.train
    assert (t.loss, t.r1_gamma, t.ema_decay, t.g_train_steps, t.g_batch_size) == ("bce", 0.0, None, 1, None)
    assert not cfg.optim.scheduled and cfg.eval.every_steps is None and cfg.eval.every_epochs is None


def test_a_checkpoint_does_not_carry_the_saving_runs_optimizer_implementation():
    """load_state_dict puts back the saved param groups; the run's own choices (capturable for CUDA graphs, fused
    on a GPU, foreach) and a capturable optimizer's learning-rate tensor come back after it (optim.keep_run_options).
    (A capturable or fused step needs a GPU: tests/system/test_gpu.py resumes an eager checkpoint into captured
    phases.)"""
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
