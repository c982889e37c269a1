"""A small CNN classifier of the six MedNIST classes: the feature extractor behind FMD.

Trained by ``mednist-gan train-classifier`` on the MedNIST images themselves (no internet, no ImageNet
weights). Its features for the quality metrics keep spatial layout: the global average of the last
stage beside a 2x2 grid of averages from the stage before it, so an upside-down or transposed hand
does not look like an upright one.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MEDNIST_CLASSES
from ..data import list_images, load_images, scale_intensity
from ..errors import CheckpointError, DataError, first_line
from ..files import sha256_file, write_atomic
from ..images import to_uint8
from ..terminal import progress_bar

CLASSES = MEDNIST_CLASSES
ASSETS = Path(__file__).parents[1] / "assets"
WEIGHTS_FILE = ASSETS / "classifier.pt"
CARD_JSON = ASSETS / "classifier.json"
CARD_MD = ASSETS / "classifier.md"


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MedNISTClassifier(nn.Module):
    """64x64 grayscale in [0, 1] (MONAI orientation) -> six class logits; ``features`` -> 320 numbers."""

    feature_size = 64 + 4 * 64

    def __init__(self, num_classes: int = len(CLASSES)):
        super().__init__()
        self.stage1, self.stage2 = _stage(1, 16), _stage(16, 32)  # 64x64, then 32x32
        self.stage3, self.stage4 = _stage(32, 64), _stage(64, 64)  # 16x16, then 8x8
        self.head = nn.Linear(64, num_classes)

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.stage1(x), 2)
        x = F.max_pool2d(self.stage2(x), 2)
        mid = self.stage3(x)
        return mid, self.stage4(F.max_pool2d(mid, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._trunk(x)[1].mean(dim=(2, 3)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mid, last = self._trunk(x)
        layout = F.adaptive_avg_pool2d(mid, 2).flatten(1)  # where things are: top/bottom, left/right
        return torch.cat([last.mean(dim=(2, 3)), layout], dim=1)


def load_classifier(path: Optional[Path] = None) -> MedNISTClassifier:
    """The shipped classifier (or the weights at ``path``), in eval mode on the CPU."""
    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"classifier weights {path}: no such file "
                              "(train them with `mednist-gan train-classifier --data-root <MedNIST>`)")
    if path == WEIGHTS_FILE:  # the shipped weights must be the ones their card describes
        from ..checkpoint import verify_recorded_sha256

        verify_recorded_sha256(path, json.loads(CARD_JSON.read_text())["sha256"], CARD_JSON)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = MedNISTClassifier()
        net.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"classifier weights {path}: not loadable "
                              f"({type(exc).__name__}: {first_line(exc, 120)})") from None
    return net.eval()


EVALUATION_SIZE = 64  # the feature extractors' input (MedNIST's size)


def to_evaluation_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> what a user gets from a saved PNG (truncated to uint8 levels, back in [0, 1]), at the
    feature extractors' 64x64: images of another size are scored after area interpolation to it (the mean of each
    block of pixels for 128 and 256), pixel-space measures included."""
    pixels = to_uint8(images).float() / 255
    if tuple(pixels.shape[-2:]) != (EVALUATION_SIZE, EVALUATION_SIZE):
        pixels = F.interpolate(pixels, size=(EVALUATION_SIZE, EVALUATION_SIZE), mode="area")
    return pixels


def check_class_folders(data_root: Path) -> None:
    """One line naming the first of the six MedNIST class folders that ``data_root`` lacks."""
    for name in CLASSES:
        if not (Path(data_root) / name).is_dir():
            raise DataError(f"--data-root {data_root}: no {name}/ folder (expected the six MedNIST class folders)")


def load_split(data_root: Path, holdout: float, seed: int, cache_dir: Optional[str] = "~/.cache/mednist_gan",
               limit_per_class: Optional[int] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images, labels), "test": ...}: a seeded per-class split, images scaled as for training."""
    data_root = Path(data_root)
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {"train": [], "test": []}
    check_class_folders(data_root)
    for label, name in enumerate(CLASSES):
        files = list_images(data_root / name)[:limit_per_class]
        images = to_evaluation_pixels(scale_intensity(load_images(files, (64, 64), cache_dir)))
        order = torch.randperm(len(images), generator=generator)
        n_test = max(1, round(holdout * len(images)))
        for part, index in (("test", order[:n_test]), ("train", order[n_test:])):
            parts[part].append((images[index], torch.full((len(index),), label)))
    return {part: (torch.cat([x for x, _ in p]), torch.cat([y for _, y in p])) for part, p in parts.items()}


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        correct += (net(images[start:start + batch_size]).argmax(1) == labels[start:start + batch_size]).sum().item()
    return correct / len(images)


def fit(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch_size: int, lr: float,
        seed: int, decay_to_zero: bool = False, log=None) -> nn.Module:
    """Cross-entropy training with Adam, a seeded shuffle per epoch (seed + 1) and, with ``decay_to_zero``, the
    learning rate decayed linearly to 0; ``log`` gets a line per epoch (and turns on a terminal progress bar)."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps) if decay_to_zero else None
    order_rng = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images), generator=order_rng)
        total = 0.0
        with progress_bar(len(order), f"epoch {epoch + 1}/{epochs}", enabled=log is not None) as bar:
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                loss = F.cross_entropy(net(images[index]), labels[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                total += loss.item() * len(index)
                bar.update(len(index))
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: training loss {total / len(order):.4f}")
    return net.eval()


def train_classifier(data_root: Path, out: Path = WEIGHTS_FILE, epochs: int = 3, batch_size: int = 128,
                     lr: float = 1e-3, holdout: float = 0.1, seed: int = 0, threads: int = 2,
                     limit_per_class: Optional[int] = None, command: str = "", log=print) -> dict:
    """Train on the seeded training split, report held-out accuracy, write weights and the card.

    Deterministic algorithms, a fixed seed and a fixed thread count: re-running reproduces the weights
    on the same machine and library versions.
    """
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    split = load_split(data_root, holdout, seed, limit_per_class=limit_per_class)
    train_x, train_y = split["train"]
    started = time.perf_counter()
    net = fit(MedNISTClassifier(), train_x, train_y, epochs, batch_size, lr, seed, log=log)
    result = {
        "train_accuracy": accuracy(net, train_x, train_y),
        "test_accuracy": accuracy(net, *split["test"]),
        "train_images": len(train_x), "test_images": len(split["test"][0]),
        "per_class_images": {name: int((torch.cat([split["train"][1], split["test"][1]]) == i).sum())
                             for i, name in enumerate(CLASSES)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    card = {
        "classes": list(CLASSES), "architecture": "MedNISTClassifier (4 conv stages 16-32-64-64, BatchNorm, ReLU)",
        "features": f"{MedNISTClassifier.feature_size}: global mean of stage 4 (64) + 2x2 grid of stage-3 means (256)",
        "data": str(data_root), "split": f"per class, seeded permutation (seed {seed}), {holdout:.0%} held out",
        "training": {"epochs": epochs, "batch_size": batch_size, "optimizer": f"Adam lr {lr}", "seed": seed,
                     "threads": threads, "deterministic": True, "limit_per_class": limit_per_class},
        "results": result, "command": command,
    }
    return save_with_card(net, out, card, (WEIGHTS_FILE, CARD_JSON, CARD_MD), _card_markdown)


def save_with_card(net: nn.Module, out: Path, card: dict, shipped: tuple[Path, Path, Path], markdown) -> dict:
    """Write a feature extractor's weights (atomically) and its card: the weights' name, sha256 and versions
    added to ``card``. At the package's own path (``shipped``: weights, card JSON, card Markdown) the shipped
    card is replaced; elsewhere the card goes beside the weights as JSON. Returns the card."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save(net.state_dict(), tmp))  # never half a weights file
    card = {"weights": out.name, "sha256": sha256_file(out), **card,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    weights, card_json, card_md = shipped
    if out.resolve() == weights.resolve():
        write_atomic(card_json, json.dumps(card, indent=2) + "\n")
        write_atomic(card_md, markdown(card))
    else:
        write_atomic(out.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    return card


def _card_markdown(card: dict) -> str:
    r = card["results"]
    training, torch_version = card["training"], card["versions"]["torch"]
    counts = ", ".join(f"{k} {v}" for k, v in r["per_class_images"].items())
    return f"""# MedNIST classifier (feature extractor for FMD)

- **Architecture**: {card["architecture"]}; features for the quality metrics: {card["features"]}.
- **Data**: the MedNIST JPEGs in `{card["data"]}` ({counts}). MedNIST is distributed under
  CC BY-SA 4.0, courtesy of Dr. Bradley J. Erickson (Department of Radiology, Mayo Clinic), gathered
  from TCIA, the RSNA Bone Age Challenge and the NIH Chest X-ray dataset; these weights are derived
  from it and carry the same attribution and share-alike terms.
- **Split**: {card["split"]}: {r["train_images"]} training, {r["test_images"]} held-out images.
- **Held-out accuracy**: {r["test_accuracy"]:.4%} (training split {r["train_accuracy"]:.4%}).
- **Training**: {training["epochs"]} epochs, batch {training["batch_size"]}, {training["optimizer"]},
  deterministic algorithms, {training["threads"]} CPU threads, {r["seconds"]} s; torch {torch_version}.
- **Weights**: `{card["weights"]}`, sha256 `{card["sha256"]}`.
- **Reproduce** (same weights on the same machine and library versions):

      {card["command"]}
"""
