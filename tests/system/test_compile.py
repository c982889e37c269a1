"""``runtime.compile``: the networks' training forward passes compiled with torch.compile train the same model.

Runs on the device at hand: on CPU (inductor's C++ kernels) here and in CI; on a GPU (Triton kernels, phases also
captured as CUDA graphs) when ``benchmarks/gpu_check.sh`` runs it there. Compiling takes a minute or two on CPU.
"""

from __future__ import annotations

import pytest
import torch

from mednist_gan.config import load_config
from mednist_gan.models.networks import ResNetGenerator, build_discriminator, build_generator
from mednist_gan.runtime.accelerator import compiled_forwards
from mednist_gan.training.trainer import Trainer

from helpers import CONFIGS, reset_accelerate

STEPS = 4



def _weights(nets: dict) -> dict:
    """A float32 CPU copy of each network's state_dict, keys prefixed with its name."""
    return {f"{name}.{k}": v.detach().float().cpu().clone()
            for name, net in nets.items() for k, v in net.state_dict().items()}


def _run(tmp_path, mednist_root, compile_: bool, options: list[str]):
    # Dropout off: compiled code draws its masks with other random streams than eager code.
    cfg = load_config(CONFIGS / "debug.yaml", [
        f"run_dir={tmp_path / f'compile-{compile_}'}", f"data.root={mednist_root}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.limit=96", "train.batch_size=16", "train.d_train_steps=2",
        "train.loss=ns", "train.r1_gamma=1.0", "train.r1_every=3", "train.ema_decay=0.9", "model.d_dropout=0",
        "runtime.tf32=false", f"runtime.compile={str(compile_).lower()}", *options])
    torch._dynamo.reset()
    trainer = Trainer(cfg)
    unwrap = trainer.acc.unwrap_model
    trainer.initial = _weights({"G": unwrap(trainer.G), "D": unwrap(trainer.D)})
    batches, metrics = iter(trainer.loader), []
    for _ in range(STEPS):
        indices = next(batches)
        step = trainer.gan_step.run(trainer.gan_step.prepare_reals(indices), trainer.gan_step.real_labels(indices),
                                     step=trainer.state.step)
        metrics.append({k: v.item() for k, v in step.items()})
        trainer.state.step += 1
    weights = _weights({"G": unwrap(trainer.G), "D": unwrap(trainer.D), "EMA": trainer.ema})
    reset_accelerate()
    return cfg, trainer, metrics, weights


@pytest.mark.parametrize("options", [
    [],
    ["model.arch=resnet", "model.resnet_g_channels=2", "model.resnet_d_channels=2", "model.latent_size=16"],
    ["model.arch=resnet", "model.resnet_g_channels=2", "model.resnet_d_channels=2", "model.latent_size=16",
     "model.resnet_d_sn=false"],
], ids=["bundle-lazy-r1", "resnet", "resnet-plain-d"])
def test_compiled_forward_passes_train_the_same_model(tmp_path, mednist_root, options):
    cfg, _, eager_metrics, eager_weights = _run(tmp_path, mednist_root, False, options)
    _, trainer, metrics, weights = _run(tmp_path, mednist_root, True, options)
    # It did compile (the modules themselves stay plain: the same state_dict keys, no "_orig_mod." prefix); the
    # spectrally normalised discriminator stays eager (runtime.compiled_forwards says why), a plain one compiles.
    compiled = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(trainer.gan_step.g_forward, compiled)
    assert isinstance(trainer.gan_step.d_forward, compiled) == (cfg.model.arch == "monai" or not cfg.model.resnet_d_sn)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert weights.keys() == eager_weights.keys()
    # Every step's losses agree (R1 steps 0 and 3 ran D's forward on the real images eagerly, the others compiled).
    assert any(m["r1"] > 0 for m in metrics) and any(m["r1"] == 0 for m in metrics)
    for step, (a, b) in enumerate(zip(eager_metrics, metrics)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), f"step {step} {key}"
    # Weights: other kernels (fused, other summation orders) change gradients at round-off level, and a GAN's
    # updates (Adam's sign-like first steps on both networks) grow that to a few percent within four iterations,
    # so element-wise closeness is the wrong test. Both runs must move the weights the same way: the compiled
    # run's change from the initial weights points where the eager run's does, and is as long.
    for net in ("G", "D"):
        keys = [k for k in weights if k.startswith(net + ".") and weights[k].is_floating_point()]
        start = torch.cat([trainer.initial[k].flatten() for k in keys])
        eager = torch.cat([eager_weights[k].flatten() for k in keys]) - start
        compiled = torch.cat([weights[k].flatten() for k in keys]) - start
        cosine = torch.nn.functional.cosine_similarity(eager, compiled, dim=0).item()
        assert cosine > 0.98 and compiled.norm() == pytest.approx(eager.norm().item(), rel=0.05), \
            f"{net}: cosine {cosine:.4f}, change {compiled.norm():.4g} vs eager {eager.norm():.4g}"


def test_what_stays_eager_is_said(tmp_path, mednist_root):
    """Networks compile would break stay eager, and the log line names them: a conditional generator and a spectrally
    normalised discriminator."""
    cfg = load_config(CONFIGS / "conditional.yaml", [f"run_dir={tmp_path}", "runtime.compile=true"])
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    g, d, note = compiled_forwards(G, D, cfg)
    assert g is G and d is D
    assert note.startswith("runtime.compile: eager generator (class-conditional") and "discriminator (spectral" in note
    bundle = load_config(CONFIGS / "bundle.yaml", ["runtime.compile=true"])
    g, d, note = compiled_forwards(G, D, bundle)
    assert isinstance(g, torch._dynamo.eval_frame.OptimizedModule) and note is not None and "generator" not in note
    assert compiled_forwards(G, D, load_config(CONFIGS / "bundle.yaml")) == (G, D, None)


def test_inductor_still_gets_conditional_generator_gradients_wrong():
    """Why compiled_forwards keeps a conditional generator eager: compiled, its forward is right and its gradients
    are thousands of times too large (torch 2.13, CPU). When this fails, PyTorch fixed it: compile it again."""
    torch.manual_seed(0)
    G = ResNetGenerator(latent_size=16, channels=2, num_classes=2)
    z, labels, weights = torch.randn(16, 16, requires_grad=True), torch.arange(16) % 2, torch.randn(16, 1, 64, 64)
    results = []
    for forward in (G, torch.compile(G)):
        z.grad = None
        out = forward(z, labels)
        (out * weights).sum().backward()
        results.append((out.detach(), z.grad.clone()))
    (eager_out, eager_grad), (compiled_out, compiled_grad) = results
    torch._dynamo.reset()
    assert torch.allclose(eager_out, compiled_out, atol=1e-5)
    assert (compiled_grad - eager_grad).norm() > 10 * eager_grad.norm()
