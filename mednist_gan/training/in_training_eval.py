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
from typing import Optional

import torch

from .. import checkpoint as ckpt
from ..config import Config
from ..data import scale_intensity
from ..errors import first_line
from ..generator.export import export_generator
from ..files import BEST_DIR, PROVENANCE_FILE, recover_folder
from ..models.networks import generator_copy

LATENT_SEED_OFFSET = 2_000_003


class InTrainingEvaluation:
    """For a class-conditional generator (``model.classes``): the real subset holds as many images of each
    class (classes evaluated evenly), the generator makes as many of each, the scores are those of the mix,
    and each class is also scored on its own (``eval/<class>/<score>``)."""

    def __init__(self, cfg: Config, images: torch.Tensor, run_dir: Path, device: torch.device, log: logging.Logger,
                 labels: Optional[torch.Tensor] = None):
        self.cfg, self.images, self.labels, self.device, self.log = cfg, images, labels, device, log
        self.classes = list(cfg.model.classes)
        self.best_dir = Path(run_dir) / BEST_DIR
        self.num_samples = min(cfg.eval.num_samples, len(images))
        self.meters = None  # built at the first evaluation: they load the feature extractors
        self.best_key = f"eval/{cfg.eval.best_metric}"
        self.best = read_best_score(self.best_dir, self.best_key, log) if cfg.eval.keep_best else math.inf

    def _real_subsets(self) -> dict[Optional[int], torch.Tensor]:
        """Seeded picks of real images: {None: all of them} unconditionally, {label: its class's} otherwise."""
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        if not self.classes:
            return {None: torch.randperm(len(self.images), generator=g)[:self.num_samples]}
        per_class = max(2, self.num_samples // len(self.classes))
        picks = {}
        for label in range(len(self.classes)):
            members = (self.labels == label).nonzero().squeeze(1)
            picks[label] = members[torch.randperm(len(members), generator=g)[:per_class]]
        return picks

    def __call__(self, generator: torch.nn.Module, autocast, step: int, provenance: dict) -> dict:
        """Score ``generator`` (under ``autocast``); export it to ``best/`` when its ``eval.best_metric`` is the
        lowest so far."""
        from ..quality.evaluate import sample_images
        from ..quality.scores import QualityMeter

        cfg = self.cfg
        picks = self._real_subsets()
        if self.meters is None:
            everything = torch.cat(list(picks.values()))
            mix = QualityMeter(scale_intensity(self.images[everything]), cfg.eval.classifier, seed=cfg.train.seed,
                               device=self.device, encoder=cfg.eval.encoder)
            self.meters = {None: mix}
            if self.classes:
                self.meters.update({label: QualityMeter(scale_intensity(self.images[pick]), seed=cfg.train.seed,
                                                        device=self.device, nets=mix.nets)
                                    for label, pick in picks.items()})
        generated = {}
        with autocast:
            for label, pick in picks.items():
                generated[label] = sample_images(generator, cfg.model.latent_size, len(pick),
                                                 cfg.train.seed + LATENT_SEED_OFFSET, "normal", device=self.device,
                                                 label=label)
        scores = self.meters[None].score(torch.cat(list(generated.values())))
        result = {**{f"eval/{key}": value for key, value in asdict(scores).items()},
                  "eval/diversity_real": self.meters[None].real_diversity}
        for label, images in generated.items():
            if label is not None:
                name = self.classes[label]
                result.update({f"eval/{name}/{key}": value
                               for key, value in asdict(self.meters[label].score(images)).items()})
        self.log.info("evaluation at step %d: FMD %.3f FD-SSL %.3f precision %.3f recall %.3f "
                      "diversity %.4f (real %.4f)%s",
                      step, scores.fmd, scores.fd_ssl, scores.precision, scores.recall, scores.diversity,
                      self.meters[None].real_diversity,
                      "".join(f"; {c} FD-SSL {result[f'eval/{c}/fd_ssl']:.3f}" for c in self.classes))
        if cfg.eval.keep_best and result[self.best_key] < self.best:
            self.best = result[self.best_key]
            export_generator(generator_copy(cfg.model, generator), cfg.model, self.best_dir,
                             {**provenance, "eval": {**result, "num_samples": self.num_samples},
                              "config": cfg.to_dict()})
            self.log.info("new best %s %.3f: exported to %s", cfg.eval.best_metric, self.best, self.best_dir)
        return result


def read_best_score(best_dir: Path, key: str, log: logging.Logger) -> float:
    """The score ``key`` (e.g. ``eval/fd_ssl``) of the generator kept in ``best_dir`` by an earlier (resumed) run;
    inf when there is none, or when its record predates that score (the next evaluation then starts a new best).

    A ``best_dir`` whose record cannot be read is moved aside (``damaged-best``), never overwritten; one that a
    killed export had renamed aside is first put back.
    """
    recover_folder(best_dir)
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
