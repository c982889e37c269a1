"""What the discriminator sees, augmented, for small data sets: real and generated images alike, so that D cannot
learn the augmentation and G is not taught it (the transforms are differentiable in the images).

``train.d_augment``:
- ``diffaugment`` (Zhao et al. 2020): every transform on every image;
- ``ada`` (Karras et al. 2020, StyleGAN2-ADA): each transform on each image with probability p, adjusted every
  ``train.ada_interval`` iterations from the sign of D's logits on real images, r_t = E[sign D(x)] (how sure D
  is of the training images: near 1 when it has memorised them): p moves up while r_t > ``train.ada_target``, down
  below it, by at most the batch's share of ``train.ada_images``.

The transforms, for grey images in [0, 1]: brightness (an offset in [-0.5, 0.5]), contrast (a factor in
[0.5, 1.5] around the image's mean), translation (up to 1/8 of the side, zero fill) and cutout (a square of half
the side, zeroed). Their per-image parameters are one tensor (N, 10), drawn by ``draw`` for the global batch
from the step's shared augmentation stream (each process keeps its slice, so one and N processes augment
alike) and applied by ``augment`` inside the phases (an input of a CUDA graph like the latents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSFORMS = ("brightness", "contrast", "translation", "cutout")
PARAMETERS = 10  # 4 on/off flags, brightness, contrast, translation (dy, dx), cutout centre (y, x)


def draw(n: int, size: int, p: float, device: torch.device | str, generator: torch.Generator) -> torch.Tensor:
    """Parameters (n, 10) for ``n`` images of side ``size``, each transform on with probability ``p``."""
    u = torch.rand(n, PARAMETERS, device=device, generator=generator)
    on = (u[:, :4] < p).float()
    brightness, contrast = u[:, 4:5] - 0.5, u[:, 5:6] + 0.5
    shift = torch.round((u[:, 6:8] * 2 - 1) * (size // 8))
    centre = torch.floor(u[:, 8:10] * size)
    return torch.cat([on, brightness, contrast, shift, centre], dim=1)


def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Images (N, C, S, S) through the transforms ``params`` (from ``draw``) switch on, in DiffAugment's order."""
    on = params[:, :4].view(-1, 4, 1, 1, 1)
    brightness, contrast = params[:, 4].view(-1, 1, 1, 1), params[:, 5].view(-1, 1, 1, 1)
    x = x + on[:, 0] * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = torch.where(on[:, 1] > 0, mean + (x - mean) * contrast, x)
    x = translate(x, params[:, 6:8] * params[:, 2:3])
    return cutout(x, params[:, 8:10], params[:, 3])


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each image moved by its whole-pixel ``shift`` (N, 2: dy, dx), zeros coming in."""
    n, _, h, w = x.shape
    pad = max(h, w) // 8
    padded = F.pad(x, [pad, pad, pad, pad])
    dy, dx = shift[:, 0].long(), shift[:, 1].long()
    rows = torch.arange(h, device=x.device)[None, :] + pad - dy[:, None]  # out[y] = in[y - dy]
    cols = torch.arange(w, device=x.device)[None, :] + pad - dx[:, None]
    picked = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)


def cutout(x: torch.Tensor, centre: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """A square of half the side around each image's ``centre`` (N, 2) zeroed where ``on`` (N,) is 1."""
    _, _, h, w = x.shape
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((ys - centre[:, 0].view(-1, 1, 1)).abs() < h // 4) & ((xs - centre[:, 1].view(-1, 1, 1)).abs() < w // 4)
    return x * (1 - on.view(-1, 1, 1) * inside.to(x.dtype)).unsqueeze(1)


class AdaptiveProbability:
    """ADA's p: ``observe`` collects each iteration's mean sign of D's logits on real images (on the device, no
    sync), ``adjust`` (every ``train.ada_interval`` iterations) averages them over the iterations and processes into
    r_t and moves p by sign(r_t - target) x (images since the last adjustment) / ``train.ada_images``, within [0, 1].
    """

    def __init__(self, target: float, ada_images: int, images_per_iteration: int, device: torch.device | str):
        self.target, self.ada_images, self.images_per_iteration = target, ada_images, images_per_iteration
        self.p, self.r_t = 0.0, float("nan")
        self.signs = torch.zeros((), device=device)  # the sum of the observed means since the last adjustment
        self.count = 0

    def observe(self, real_sign: torch.Tensor) -> None:
        self.signs += real_sign.detach().float()
        self.count += 1

    def adjust(self, accelerator) -> None:
        if not self.count:
            return
        self.r_t = float(accelerator.reduce(self.signs, reduction="mean")) / self.count
        step = self.count * self.images_per_iteration / self.ada_images
        self.p = min(1.0, max(0.0, self.p + step * (1.0 if self.r_t > self.target else -1.0)))
        self.signs.zero_()
        self.count = 0

    def state(self, accelerator) -> dict:
        """What a checkpoint keeps (``TrainState``'s ADA fields), so that a resumed run moves p as this one would:
        the signs so far averaged over the processes (every process calls this), which every process resumes
        with (the mean of the processes' sums is unchanged by it)."""
        signs = float(accelerator.reduce(self.signs.clone(), reduction="mean"))
        return {"augment_p": self.p, "ada_signs": signs, "ada_count": self.count}

    def restore(self, saved: dict) -> None:
        self.p, self.count = float(saved.get("augment_p", 0.0)), int(saved.get("ada_count", 0))
        self.signs.fill_(float(saved.get("ada_signs", 0.0)))
