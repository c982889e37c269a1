"""GAN losses on discriminator logits (computed in fp32, autocast-safe) and the R1 penalty.

``bce`` is the seed bundle's formulation; ``ns`` the non-saturating logistic loss as StyleGAN writes
it; ``hinge`` the hinge loss of SAGAN/BigGAN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("bce", "ns", "hinge")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "bce":  # mean of BCE(D(real), 1) and BCE(D(fake), 0), as the bundle's discriminator_loss
        return (F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
                + F.binary_cross_entropy_with_logits(real, torch.ones_like(real))) / 2
    if kind == "ns":  # -log sigmoid(real) - log(1 - sigmoid(fake))
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    raise ValueError(f"unknown loss {kind!r}: expected one of {', '.join(LOSSES)}")


def generator_loss(fake_logits: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    fake = fake_logits.float()
    if kind == "bce":  # BCE(D(G(z)), 1), as the bundle's generator_loss
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "ns":  # -log sigmoid(D(G(z))): the same function as bce's, named as StyleGAN does
        return F.softplus(-fake).mean()
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown loss {kind!r}: expected one of {', '.join(LOSSES)}")


def mode_seeking_penalty(images: torch.Tensor, latents: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """MSGAN's term on pairs (2k, 2k+1), one value per pair: 1 / (mean |image_a - image_b| / mean |z_a - z_b| + eps).

    Large when two latents give nearly one image. The loss is a (weighted) mean over pairs, not a ratio of batch
    means, so that the processes' slices of a batch average to what one process computes on all of it.
    """
    a, b = images.float().flatten(1).unflatten(0, (-1, 2)).unbind(1)
    za, zb = latents.float().flatten(1).unflatten(0, (-1, 2)).unbind(1)
    ratio = (a - b).abs().mean(1) / (za - zb).abs().mean(1)
    return 1 / (ratio + eps)


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """E[|grad_x D(x)|^2] over the batch, with a graph so that its gradient reaches D's parameters.

    ``real`` must require grad and ``real_logits`` must be ``D(real)``.
    """
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()
