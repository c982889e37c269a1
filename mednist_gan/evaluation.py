"""Evaluation during training: FMD, KID and diversity of the output generator, and the best generator so far.

Runs on the main process only. The real images are a fixed subset of the training images (seeded),
the generated ones come from fixed latents (seed + 2,000,003), so scores are comparable over a run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config
from .data import scale_intensity
from .errors import first_line
from .export import export_generator
from .files import BEST_DIR, PROVENANCE_FILE
from .networks import generator_copy

LATENT_SEED_OFFSET = 2_000_003


class InTrainingEvaluation:
    def __init__(self, cfg: Config, images: torch.Tensor, run_dir: Path, device: torch.device, log: logging.Logger):
        self.cfg, self.images, self.device, self.log = cfg, images, device, log
        self.best_dir = Path(run_dir) / BEST_DIR
        self.num_samples = min(cfg.eval.num_samples, len(images))
        self.meter = None  # built at the first evaluation: it loads the feature extractor
        self.best_fmd = read_best_fmd(self.best_dir, log) if cfg.eval.keep_best else math.inf

    def __call__(self, generator: torch.nn.Module, autocast, step: int, provenance: dict) -> dict:
        """Score ``generator`` (under ``autocast``); export it to ``best/`` when its FMD is the lowest so far."""
        from .quality import QualityMeter, sample_images

        cfg, n = self.cfg, self.num_samples
        if self.meter is None:
            pick = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(cfg.train.seed))[:n]
            self.meter = QualityMeter(scale_intensity(self.images[pick]), cfg.eval.classifier, seed=cfg.train.seed,
                                      device=self.device)
        with autocast:
            images = sample_images(generator, cfg.model.latent_size, n, cfg.train.seed + LATENT_SEED_OFFSET, "normal",
                                   device=self.device)
        scores = self.meter.score(images)
        result = {"eval/fmd": scores.fmd, "eval/kid": scores.kid, "eval/diversity": scores.diversity,
                  "eval/diversity_real": self.meter.real_diversity}
        self.log.info("evaluation at step %d: FMD %.3f KID %.5f diversity %.4f (real %.4f)", step, scores.fmd,
                      scores.kid, scores.diversity, self.meter.real_diversity)
        if cfg.eval.keep_best and scores.fmd < self.best_fmd:
            self.best_fmd = scores.fmd
            export_generator(generator_copy(cfg.model, generator), cfg.model, self.best_dir,
                             {**provenance, "eval": {**result, "num_samples": n}, "config": cfg.to_dict()})
            self.log.info("new best FMD %.3f: exported to %s", scores.fmd, self.best_dir)
        return result


def read_best_fmd(best_dir: Path, log: logging.Logger) -> float:
    """The FMD of the generator kept in ``best_dir`` by an earlier (resumed) run; inf when there is none.

    A ``best_dir`` whose record cannot be read is moved aside (``damaged-best``), never overwritten.
    """
    if not best_dir.exists():
        return math.inf
    try:
        return float(json.loads((best_dir / PROVENANCE_FILE).read_text())["eval"]["eval/fmd"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        moved = ckpt.set_aside(best_dir)
        log.warning("%s/export.json is unreadable (%s: %s): moved %s to %s; the next evaluation starts a new best",
                    best_dir, type(exc).__name__, first_line(exc, 80), best_dir.name, moved)
        return math.inf
