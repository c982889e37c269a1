"""Evaluation during training: the output generator's scores in both feature spaces (FMD, FD-SSL, KID,
precision/recall, density/coverage, diversity; see ``quality.py``), and the best generator so far.

Runs on the main process only. The real images are a fixed subset of the training images (seeded),
the generated ones come from fixed latents (seed + 2,000,003), so scores are comparable over a run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
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
        self.best_key = f"eval/{cfg.eval.best_metric}"
        self.best = read_best_score(self.best_dir, self.best_key, log) if cfg.eval.keep_best else math.inf

    def __call__(self, generator: torch.nn.Module, autocast, step: int, provenance: dict) -> dict:
        """Score ``generator`` (under ``autocast``); export it to ``best/`` when its ``eval.best_metric`` is the
        lowest so far."""
        from .quality import QualityMeter, sample_images

        cfg, n = self.cfg, self.num_samples
        if self.meter is None:
            pick = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(cfg.train.seed))[:n]
            self.meter = QualityMeter(scale_intensity(self.images[pick]), cfg.eval.classifier, seed=cfg.train.seed,
                                      device=self.device, encoder=cfg.eval.encoder)
        with autocast:
            images = sample_images(generator, cfg.model.latent_size, n, cfg.train.seed + LATENT_SEED_OFFSET, "normal",
                                   device=self.device)
        scores = self.meter.score(images)
        result = {**{f"eval/{key}": value for key, value in asdict(scores).items()},
                  "eval/diversity_real": self.meter.real_diversity}
        self.log.info("evaluation at step %d: FMD %.3f FD-SSL %.3f precision %.3f recall %.3f diversity %.4f (real %.4f)",
                      step, scores.fmd, scores.fd_ssl, scores.precision, scores.recall, scores.diversity,
                      self.meter.real_diversity)
        if cfg.eval.keep_best and result[self.best_key] < self.best:
            self.best = result[self.best_key]
            export_generator(generator_copy(cfg.model, generator), cfg.model, self.best_dir,
                             {**provenance, "eval": {**result, "num_samples": n}, "config": cfg.to_dict()})
            self.log.info("new best %s %.3f: exported to %s", cfg.eval.best_metric, self.best, self.best_dir)
        return result


def read_best_score(best_dir: Path, key: str, log: logging.Logger) -> float:
    """The score ``key`` (e.g. ``eval/fd_ssl``) of the generator kept in ``best_dir`` by an earlier (resumed) run;
    inf when there is none, or when its record predates that score (the next evaluation then starts a new best).

    A ``best_dir`` whose record cannot be read is moved aside (``damaged-best``), never overwritten.
    """
    if not best_dir.exists():
        return math.inf
    try:
        scores = json.loads((best_dir / PROVENANCE_FILE).read_text())["eval"]
        if key not in scores:
            log.info("%s was kept by another measure than %s: the next evaluation starts a new best", best_dir, key)
            return math.inf
        return float(scores[key])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        moved = ckpt.set_aside(best_dir)
        log.warning("%s/export.json is unreadable (%s: %s): moved %s to %s; the next evaluation starts a new best",
                    best_dir, type(exc).__name__, first_line(exc, 80), best_dir.name, moved)
        return math.inf
