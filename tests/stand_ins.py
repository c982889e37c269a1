"""Modules that stand in for trained generators: the documented interface without training one."""

from __future__ import annotations

import json

import torch

from mednist_gan.quality.evaluate import load_real_images


class ForeignGenerator(torch.nn.Module):
    """A generator of another structure than MONAI's (no ``linear.weight``) that keeps the documented interface:
    latents (N, L) -> images (N, 1, size, size) in [0, 1]."""

    def __init__(self, latent_size: int = 16, size: int = 64):
        super().__init__()
        self.size = size
        self.basis = torch.nn.Parameter(torch.randn(latent_size, size * size,
                                                    generator=torch.Generator().manual_seed(0)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(latents @ self.basis).reshape(-1, 1, self.size, self.size)


class RealImagesByClass(torch.nn.Module):
    """Stands in for a class-conditional generator: (latents, labels) -> real images of those classes, one
    picked by each latent. ``classes`` are the model's own class names, in its label order."""

    def __init__(self, images: list[torch.Tensor]):
        super().__init__()
        count = min(len(x) for x in images)
        self.register_buffer("bank", torch.stack([x[:count] for x in images]))  # (classes, count, 1, 64, 64)

    def forward(self, latents: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pick = (latents[:, 0] * 1e6).long().abs() % self.bank.shape[1]
        return self.bank[labels, pick]


def conditional_stand_in(folder, root, classes, per_class: int):
    """A TorchScript stand-in for a conditional generator of ``classes``, with the export.json that names them."""
    from mednist_gan.files import PROVENANCE_FILE

    folder.mkdir(parents=True, exist_ok=True)
    images = [load_real_images(root / name)[:per_class] for name in classes]
    torch.jit.script(RealImagesByClass(images)).save(str(folder / "generator.ts"))
    (folder / PROVENANCE_FILE).write_text(json.dumps({"files": {}, "classes": list(classes)}))
    return folder / "generator.ts"
