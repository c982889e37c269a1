"""GAN losses on discriminator logits: the bundle's BCE formulation, computed stably and autocast-safe."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Mean of BCE(D(real), 1) and BCE(D(fake), 0), as the bundle's ``discriminator_loss``."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32))
    return (fake + real) / 2


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(G(z)), 1), as the bundle's ``generator_loss``."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))
