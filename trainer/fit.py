"""One training run from few-shot samples to a trained learner: what `promptserve-train train`, the reproduction
harness and the benchmarks all call, so a recipe means the same thing everywhere.

The run seeds everything first (random inits follow the run's seed), holds out `TrainConfig.holdout` of each
class's shots for checkpoint selection (the last shots of each class, in sample order: the sampler's draw is
already random), builds the learner's training set (cached views, or fresh augmentations every step) and trains.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from service.core.backbone import Backbone
from trainer.configs import TrainConfig
from trainer.data import Sample
from trainer.engine import EpochStats, seed_everything, selected_epoch, train_learner
from trainer.features import Views
from trainer.methods import build_learner
from trainer.methods.base import Learner


@dataclass(frozen=True)
class Fitted:
    learner: Learner
    history: list[EpochStats]
    trained_on: int  # images trained on
    held_out: int  # images held out for checkpoint selection
    seconds: float

    @property
    def kept_epoch(self) -> int:
        return selected_epoch(self.history)


def split_holdout(samples: list[Sample], descriptions: list[str | None], cfg: TrainConfig
                  ) -> tuple[tuple[list[Sample], list[str | None]], tuple[list[Sample], list[str | None]]]:
    """((training samples, descriptions), (held-out samples, descriptions)): the last `cfg.held_out_shots(n)` of
    each class's n shots are held out."""
    counts, seen, held = Counter(s.label for s in samples), Counter[int](), []
    for s in samples:
        seen[s.label] += 1
        held.append(seen[s.label] > counts[s.label] - cfg.held_out_shots(counts[s.label]))
    keep = [i for i, h in enumerate(held) if not h]
    out = [i for i, h in enumerate(held) if h]
    return (([samples[i] for i in keep], [descriptions[i] for i in keep]),
            ([samples[i] for i in out], [descriptions[i] for i in out]))


def fit(method: str, config: Any, cfg: TrainConfig, backbone: Backbone, classnames: tuple[str, ...],
        samples: list[Sample], descriptions: list[str | None] | None = None) -> Fitted:
    """Train `method` (its `config`) on `samples` under `cfg`; `descriptions` align with `samples` (TGP-T)."""
    start = time.perf_counter()
    seed_everything(cfg.seed, cfg.deterministic)
    learner = build_learner(method, config, backbone, classnames)
    (train, train_texts), (held, held_texts) = split_holdout(samples, descriptions or [None] * len(samples), cfg)
    data = learner.training_set(train, train_texts, Views(cfg.views, cfg.seed, cfg.crop_scale), cfg.progress)
    held_set = learner.training_set(held, held_texts, Views(1)) if held else None
    history = train_learner(learner, data, cfg, held_set)
    return Fitted(learner, history, len(train), len(held), time.perf_counter() - start)
