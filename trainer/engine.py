"""Training loops: from cached image features (text-side methods), or through the image tower each step.

Both loops share one optimizer step, SGD/AdamW, and a per-step schedule: a constant warm-up learning
rate for `warmup_epochs` (CoOp's 1e-5) or `warmup_steps` (TGP-T's 100 iterations), then cosine decay from
`lr` to 0. The loss is the learner's own (`learner.loss`: cross-entropy for text-side prompts).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from service.core.backbone import Backbone
from trainer.configs import TrainConfig
from trainer.data import Sample, open_image
from trainer.features import CachedSet, Transform, train_transform
from trainer.methods.base import Learner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float  # percent, on the training batches as seen
    lr: float
    seconds: float


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: constant warm-up at `warmup_lr`, then cosine from `lr` to 0."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch if cfg.warmup_steps is None else min(cfg.warmup_steps, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return cfg.warmup_lr / cfg.lr
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Run:
    """One training run's optimizer, schedule and step; the loops below feed it batches."""

    def __init__(self, learner: Learner, cfg: TrainConfig, steps_per_epoch: int):
        params = [p for p in learner.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(learner).__name__} has no trainable parameters")
        self.learner, self.cfg = learner, cfg
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, steps_per_epoch)
        log.info("training %s: %d trainable parameters", learner.method, learner.trainable_parameters())

    def step(self, inputs: Any, labels: torch.Tensor) -> tuple[float, int]:
        loss, logits = self.learner.loss(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.learner.after_step()
        return loss.item() * len(labels), int((logits.argmax(-1) == labels).sum())

    def epoch(self, epoch: int, batches: Iterator[tuple[Any, torch.Tensor]], total: int) -> EpochStats:
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}", unit="step", disable=not self.cfg.progress)
        for features, labels in bar:
            batch_loss, batch_correct = self.step(features, labels)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.1f}")
        stats = EpochStats(epoch, loss_sum / seen, 100.0 * correct / seen, lr, time.perf_counter() - start)
        log.info("epoch %d: loss %.4f, train acc %.2f%%, lr %.2e, %.2fs", *vars(stats).values())
        return stats


def train_cached(learner: Learner, data: CachedSet, cfg: TrainConfig) -> list[EpochStats]:
    """Train from cached image outputs (features, or TGP-T's tokens): each epoch visits every image once,
    in one randomly chosen view."""
    if learner.needs_image_tower:
        raise ValueError(f"{learner.method} changes the image tower; train it with train_on_images")
    seed_everything(cfg.seed, cfg.deterministic)
    n = len(data.labels)
    steps = math.ceil(n / cfg.batch_size)
    run = _Run(learner.train(), cfg, steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=generator)
        view = torch.randint(data.views, (n,), generator=generator)
        batches = (data.batch(idx, view[idx]) for idx in order.split(cfg.batch_size))
        history.append(run.epoch(epoch, batches, steps))
    learner.eval()
    return history


def train_on_images(
    learner: Learner, backbone: Backbone, samples: list[Sample], cfg: TrainConfig,
    transform: Transform | None = None,
) -> list[EpochStats]:
    """The plain loop: augment and run the image tower on every step (for methods that change it).

    Images are decoded once up front, so the time measured is the image tower's, not the decoder's.
    """
    seed_everything(cfg.seed, cfg.deterministic)
    transform = transform or train_transform(backbone)
    images = [open_image(s.path) for s in samples]
    labels = torch.tensor([s.label for s in samples])
    steps = math.ceil(len(samples) / cfg.batch_size)
    run = _Run(learner.train(), cfg, steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(samples), generator=generator)
        batches = (_image_batch(learner, images, labels, idx, transform) for idx in order.split(cfg.batch_size))
        history.append(run.epoch(epoch, batches, steps))
    learner.eval()
    return history


def _image_batch(
    learner: Learner, images: list[Image.Image], labels: torch.Tensor, idx: torch.Tensor, transform: Transform
) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.stack([transform(images[i]) for i in idx.tolist()])
    return learner.image_features(pixels), labels[idx]
