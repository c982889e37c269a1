"""One iteration of the project's trainer equals one iteration of monai.engines.GanTrainer (the bundle's loop)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from monai.engines import GanTrainer
from torch.utils.data import DataLoader

from mednist_gan.config import load_config
from mednist_gan.data import list_images, load_images, scale_intensity
from mednist_gan.training.trainer import Trainer

from helpers import CONFIGS, assert_close_up_to_adam_round_off


def _bundle_losses():
    """The seed bundle's scripts/losses.py formulation: D ends in a Sigmoid, BCELoss."""
    bce = torch.nn.BCELoss()

    def d_loss(gen_images, real_images, disc_net):
        real = real_images.new_full((real_images.shape[0], 1), 1)
        gen = gen_images.new_full((gen_images.shape[0], 1), 0)
        real_loss = bce(disc_net(real_images), real)
        gen_loss = bce(disc_net(gen_images.detach()), gen)
        return (gen_loss + real_loss) / 2

    def g_loss(gen_images, disc_net):
        out = disc_net(gen_images)
        return bce(out, out.new_full(out.shape, 1))

    return d_loss, g_loss


@pytest.mark.parametrize("d_train_steps", [1, 5])
def test_one_iteration_matches_monai_gan_trainer(tmp_path, mednist_root, d_train_steps):
    batch = 8
    cfg = load_config(CONFIGS / "bundle.yaml", [
        f"run_dir={tmp_path}", f"data.root={mednist_root}", "data.limit=8", "data.augment=false",
        f"train.batch_size={batch}", f"train.d_train_steps={d_train_steps}", "runtime.channels_last=false",
        "runtime.cpu_mask_dropout=false",  # PyTorch's own dropout: the same masks as MONAI's side, seeded alike
        f"data.cache_dir={tmp_path / 'cache'}"])
    trainer = Trainer(cfg)
    G, D = trainer.acc.unwrap_model(trainer.G), trainer.acc.unwrap_model(trainer.D)

    # MONAI's side: copies of the same initial weights; D with the bundle's Sigmoid head.
    ref_G, ref_D = copy.deepcopy(G), copy.deepcopy(D)
    ref_D.add_module("sigmoid_head", torch.nn.Sigmoid())
    ref_D.forward = lambda x, _f=ref_D.forward: ref_D.sigmoid_head(_f(x))
    ref_opt_g = torch.optim.Adam(ref_G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    ref_opt_d = torch.optim.Adam(ref_D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = scale_intensity(load_images(list_images(mednist_root / "Hand")[:batch]))
    d_loss, g_loss = _bundle_losses()
    loader = DataLoader([real[i] for i in range(batch)], batch_size=batch, generator=torch.Generator())
    engine = GanTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader,
        g_network=ref_G, g_optimizer=ref_opt_g, g_loss_function=partial(g_loss, disc_net=ref_D),
        d_network=ref_D, d_optimizer=ref_opt_d, d_loss_function=partial(d_loss, disc_net=ref_D),
        d_prepare_batch=lambda b, device=None, non_blocking=False: b.to(device),
        d_train_steps=d_train_steps, g_update_latents=True, latent_shape=64,
    )

    # Same global RNG stream on both sides (latents and dropout masks): MONAI draws latents from it.
    torch.manual_seed(123)
    engine.run()
    torch.manual_seed(123)
    trainer.gan_step.latent_rng = torch.default_generator  # draw latents exactly as GanTrainer does
    trainer.gan_step.run(real, step=trainer.state.step)

    # The same computation in other kernels (our D outputs logits and uses BCE-with-logits, MONAI's a
    # Sigmoid head and BCELoss; oneDNN picks its kernels by CPU): equal up to round-off, which Adam amplifies
    # to a full +-lr step wherever a gradient is at round-off level. That includes every convolution bias
    # directly followed by instance norm (zero true gradient: the norm cancels it), and, depending on the CPU,
    # a rare element whose gradient happens to be near zero. So: allclose for all but a sliver of elements,
    # none further apart than Adam can move them, and the networks' outputs allclose (below).
    for name, a, b, lr, updates in (("G", G, ref_G, cfg.optim.g_lr, 1), ("D", D, ref_D, cfg.optim.d_lr, d_train_steps)):
        assert_close_up_to_adam_round_off(a.state_dict(), b.state_dict(), lr=lr, betas=tuple(cfg.optim.betas),
                                          updates=updates, what=f"{name} vs MONAI's GanTrainer")
    G.eval(), ref_G.eval(), D.eval(), ref_D.eval()
    with torch.no_grad():
        z = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
        g_apart = (G(z) - ref_G(z)).abs()
        d_apart = (torch.sigmoid(D(real)) - ref_D(real)).abs()
    # Round-off, flipped elements included, left the outputs within 2e-5 (measured with oneDNN's SSE4.1,
    # AVX2 and AVX-512 kernels, 1 and 2 threads); a semantic difference (one discriminator step fewer,
    # other latents) moved them by 2e-3 or more.
    assert g_apart.max() < 2e-4 and g_apart.mean() < 1e-5, (g_apart.max(), g_apart.mean())
    assert d_apart.max() < 2e-4, d_apart.max()
    # The update really happened (the comparison is not between untouched initial weights).
    assert not torch.allclose(G.state_dict()["linear.weight"], trainer_initial_linear(cfg), atol=1e-5)


def trainer_initial_linear(cfg):
    from accelerate.utils import set_seed

    from mednist_gan.models.networks import build_generator

    set_seed(cfg.train.seed)
    return build_generator(cfg.model).state_dict()["linear.weight"]
