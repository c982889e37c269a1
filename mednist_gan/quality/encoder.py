"""A self-supervised MedNIST encoder: the second feature space of the quality metrics, trained without labels.

The classifier behind FMD (``classifier.py``) learned what tells six very different classes apart, and
such features can be blind to what makes a generated X-ray look generated (or, the other way round,
call a mildly blurred real hand 30x worse than a generator with malformed fingers). This encoder is
trained by SimCLR's contrastive objective (Chen et al., 2020): two random views of an image must map
close together and away from the other images of the batch. What the views may differ in is what the
features learn to ignore, so the augmentations are chosen for grayscale X-rays and for the metric:
crops, small shifts and rotations, contrast and brightness, and SimCLR's Gaussian blur in half of the
views (mild blur does not change what an X-ray shows; malformed fingers do). No flips (an upside-down
hand must look wrong) and no noise.

Trained by ``mednist-gan train-encoder`` on all six classes of the complete MedNIST set, deterministic on
the CPU; shipped with a card (``assets/encoder.md``) like the classifier.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import ASSETS, CLASSES, load_split, save_with_card
from ..errors import CheckpointError, first_line
from ..terminal import progress_bar

WEIGHTS_FILE = ASSETS / "encoder.pt"
CARD_JSON = ASSETS / "encoder.json"
CARD_MD = ASSETS / "encoder.md"


def _stage(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=2, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MedNISTEncoder(nn.Module):
    """64x64 grayscale in [0, 1] -> 4 stride-2 stages (32x32x32 ... 4x4x128); ``features`` -> 128 numbers.

    ``forward`` is the training path: the projection head's output, which the contrastive loss compares.
    ``features`` is SimCLR's representation, the one before the head: the last stage's global average.
    Layout still counts (no flips among the views: an upside-down hand scores 38x the floor). Of the
    layers and poolings tried (docs/experiments/quality-history.md), it is the one that ranks real hands
    blurred with sigma 1.5 ahead of the generators' malformed ones, as the eye does; a 2x2 grid of the third
    stage beside it ranked them 1.8x worse than the shipped generator.
    """

    feature_size = 128

    def __init__(self, width: int = 32, projection: int = 64):
        super().__init__()
        self.stages = nn.Sequential(_stage(1, width, 5), _stage(width, 2 * width),
                                    _stage(2 * width, 4 * width), _stage(4 * width, 4 * width))
        self.head = nn.Sequential(nn.Linear(4 * width, 4 * width * 2), nn.BatchNorm1d(4 * width * 2),
                                  nn.ReLU(inplace=True), nn.Linear(4 * width * 2, projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x).mean(dim=(2, 3)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).mean(dim=(2, 3))


def load_encoder(path: Optional[Path] = None) -> MedNISTEncoder:
    """The shipped encoder (or the weights at ``path``), in eval mode on the CPU."""
    from ..checkpoint import verify_recorded_sha256

    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"encoder weights {path}: no such file "
                              "(train them with `mednist-gan train-encoder --data-root <MedNIST>`)")
    if path == WEIGHTS_FILE:
        verify_recorded_sha256(path, json.loads(CARD_JSON.read_text())["sha256"], CARD_JSON)
    try:
        net = MedNISTEncoder()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise CheckpointError(f"encoder weights {path}: not loadable "
                              f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    return net.eval()


# ----------------------------------------------------------------------------- views and the loss

def random_views(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random view of each image (N, 1, 64, 64) in [0, 1]: a crop of 45-100% of the area, aspect
    3:4-4:3, anywhere in the image, rotated by up to 10 degrees, resized back to 64x64; then contrast
    x0.6-1.4 about the image's mean and brightness +-0.15; half of the views then blurred with a Gaussian
    of sigma 0.1-2.0. Parameters come from ``generator``."""
    n = len(images)
    u = torch.rand(n, 7, generator=generator)
    area, log_ratio = 0.45 + 0.55 * u[:, 0], math.log(3 / 4) + math.log(16 / 9) * u[:, 1]
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)
    angle = math.radians(10) * (2 * u[:, 4] - 1)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([w * cos, -h * sin, cx], 1), torch.stack([w * sin, h * cos, cy], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    views = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    contrast, brightness = (0.6 + 0.8 * u[:, 5]).view(n, 1, 1, 1), (0.3 * u[:, 6] - 0.15).view(n, 1, 1, 1)
    views = ((views - mean) * contrast + mean + brightness).clamp(0, 1)
    blurred = torch.rand(n, generator=generator) < BLUR_P
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(n, generator=generator)
    if blurred.any():
        views = views.clone()
        views[blurred] = gaussian_blur(views[blurred], sigma[blurred])
    return views


BLUR_P, BLUR_SIGMA = 0.5, (0.1, 2.0)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 5) -> torch.Tensor:
    """Each image (N, 1, H, W) blurred with its own Gaussian ``sigma`` (N,): separable, reflected edges."""
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True))[:, None, None, :]  # (N, 1, 1, K)
    x = F.pad(images.transpose(0, 1), (radius, radius, radius, radius), mode="reflect")  # (1, N, H+2r, W+2r)
    x = F.conv2d(x, kernel, groups=len(images))
    x = F.conv2d(x, kernel.transpose(2, 3), groups=len(images))
    return x.transpose(0, 1)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's partner is the positive among the other 2N - 1 views."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------- training

def train_encoder(data_root: Path, out: Path = WEIGHTS_FILE, epochs: int = 5, batch_size: int = 256, lr: float = 1e-3,
                  temperature: float = 0.2, holdout: float = 0.1, seed: int = 0, threads: int = 2,
                  limit_per_class: Optional[int] = None, command: str = "", log=print) -> dict:
    """Contrastive training on the seeded training split of every class (the classifier's split function, so
    the same images are held out); writes the weights and their card. Deterministic algorithms, a fixed
    seed and a fixed thread count: re-running reproduces the weights on the same machine and versions."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    split = load_split(data_root, holdout, seed, limit_per_class=limit_per_class)
    train_x = split["train"][0]
    net = MedNISTEncoder().to(memory_format=torch.channels_last)
    steps_per_epoch = len(train_x) // batch_size
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                                   pct_start=0.1)
    rng = torch.Generator().manual_seed(seed + 1)
    started = time.perf_counter()
    history = []
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=rng)
        total = 0.0
        with progress_bar(steps_per_epoch * batch_size, f"epoch {epoch + 1}/{epochs}") as bar:  # on a terminal only
            for step in range(steps_per_epoch):  # full batches only: the loss's negatives stay 2N - 2
                batch = train_x[order[step * batch_size:(step + 1) * batch_size]]
                views = [random_views(batch, rng).contiguous(memory_format=torch.channels_last) for _ in range(2)]
                loss = nt_xent(net(views[0]), net(views[1]), temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                total += loss.item()
                bar.update(batch_size)
        history.append(round(total / max(1, steps_per_epoch), 4))
        log(f"epoch {epoch + 1}/{epochs}: contrastive loss {history[-1]:.4f}")
    net = net.to(memory_format=torch.contiguous_format).eval()
    result = {"loss_per_epoch": history, "train_images": len(train_x), "held_out_images": len(split["test"][0]),
              "per_class_images": {name: int((torch.cat([split["train"][1], split["test"][1]]) == i).sum())
                                   for i, name in enumerate(CLASSES)},
              "view_retrieval_top1": view_retrieval(net, split["test"][0], seed),
              "seconds": round(time.perf_counter() - started, 1)}
    card = {
        "architecture": "MedNISTEncoder (4 stride-2 conv stages 32-64-128-128, BatchNorm, ReLU; projection head "
                        "256-64 for training only)",
        "features": f"{MedNISTEncoder.feature_size}: global mean of stage 4 (the representation before the head)",
        "objective": f"SimCLR NT-Xent, temperature {temperature}; views: {_views_description()}",
        "data": str(data_root), "split": f"per class, seeded permutation (seed {seed}), {holdout:.0%} held out "
                                         "(the classifier's split function)",
        "training": {"epochs": epochs, "batch_size": batch_size,
                     "optimizer": f"Adam lr {lr} (one-cycle), weight decay 1e-6", "seed": seed, "threads": threads,
                     "deterministic": True, "limit_per_class": limit_per_class},
        "results": result, "command": command,
    }
    return save_with_card(net, out, card, (WEIGHTS_FILE, CARD_JSON, CARD_MD), _card_markdown)


@torch.no_grad()
def view_retrieval(net: MedNISTEncoder, images: torch.Tensor, seed: int, n: int = 1000) -> float:
    """Held-out check that training worked: the share of 1,000 held-out images whose second view's nearest
    feature vector (cosine, among the 1,000 second views) is its own first view's."""
    g = torch.Generator().manual_seed(seed + 2)
    images = images[torch.randperm(len(images), generator=g)[:n]]
    a, b = (F.normalize(net.features(random_views(images, g)), dim=1) for _ in range(2))
    return float(((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean())


def _views_description() -> str:
    text = " ".join(random_views.__doc__.split(":", 1)[1].split())
    return text.replace(" Parameters come from ``generator``.", "")


def _card_markdown(card: dict) -> str:
    r = card["results"]
    counts = ", ".join(f"{k} {v}" for k, v in r["per_class_images"].items())
    t = card["training"]
    return f"""# MedNIST self-supervised encoder (the second feature space of the quality metrics)

- **Architecture**: {card["architecture"]}; features for the quality metrics: {card["features"]}.
- **Objective**: {card["objective"]}
- **Data**: the MedNIST JPEGs in `{card["data"]}` ({counts}), no labels used. MedNIST is distributed under
  CC BY-SA 4.0, courtesy of Dr. Bradley J. Erickson (Department of Radiology, Mayo Clinic), gathered
  from TCIA, the RSNA Bone Age Challenge and the NIH Chest X-ray dataset; these weights are derived
  from it and carry the same attribution and share-alike terms.
- **Split**: {card["split"]}: {r["train_images"]} training, {r["held_out_images"]} held-out images.
- **Held-out check**: a second random view finds its own first view among 1,000 held-out images
  {r["view_retrieval_top1"]:.1%} of the time. Contrastive loss per epoch: {r["loss_per_epoch"]}.
- **Training**: {t["epochs"]} epochs, batch {t["batch_size"]}, {t["optimizer"]}, deterministic algorithms,
  {t["threads"]} CPU threads, {r["seconds"]} s; torch {card["versions"]["torch"]}.
- **Weights**: `{card["weights"]}`, sha256 `{card["sha256"]}`.
- **Reproduce** (same weights on the same machine and library versions):

      {card["command"]}
"""
