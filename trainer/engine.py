"""The training loop: one loop for every learner, over whatever its training set hands out per batch.

A learner's training set (`Learner.training_set`) is either a cache (image features or TGP-T's tokens, one or
more views per image, encoded once) or images encoded afresh each step (a new random augmentation every step;
MaPLe's prompted image tower, which changes as it trains). The loop draws one view per image per epoch,
steps SGD/AdamW under a per-step schedule — a warm-up (constant at `warmup_lr`, CoOp's; or linear from it to
`lr`, TGP-T's) for `warmup_epochs` or `warmup_steps`, then cosine decay from `lr` to 0 — and stops after
`epochs` passes or `iterations` steps. With held-out shots it scores them after every epoch and restores the
weights of the best epoch at the end (accuracy, then lower held-out loss), as TGP-T's reference keeps its best
validation checkpoint. One progress bar covers the whole run (epoch n/N, loss, ETA).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.configs import TrainConfig
from trainer.features import CachedSet
from trainer.methods.base import Learner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    accuracy: float  # percent, on the training batches as seen
    lr: float
    seconds: float
    held_out: float | None = None  # percent, on the held-out shots (checkpoint selection)
    held_out_loss: float | None = None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=False)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.iterations if cfg.iterations is not None else cfg.epochs * steps_per_epoch


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: the warm-up (constant at `warmup_lr`, or linear from it to `lr`), then cosine to 0."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch if cfg.warmup_steps is None else cfg.warmup_steps
    warmup, start = min(warmup, total - 1), cfg.warmup_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return start if cfg.warmup == "constant" else start + (1 - start) * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Run:
    """One training run's optimizer, schedule, step and progress bar; `train_learner` feeds it batches."""

    def __init__(self, learner: Learner, cfg: TrainConfig, steps_per_epoch: int, epochs: int):
        params = [p for p in learner.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(learner).__name__} has no trainable parameters")
        self.learner, self.cfg, self.epochs = learner, cfg, epochs
        self.optimizer = make_optimizer(params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, steps_per_epoch)
        self.bar = tqdm(total=total_steps(cfg, steps_per_epoch), desc=f"training {learner.method}", unit="step",
                        disable=not cfg.progress)
        log.info("training %s: %d trainable parameters", learner.method, learner.trainable_parameters())

    def step(self, inputs: Any, labels: torch.Tensor) -> tuple[float, int]:
        loss, logits = self.learner.loss(inputs, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.learner.after_step()
        return loss.item() * len(labels), int((logits.argmax(-1).cpu() == labels.cpu()).sum())

    def epoch(self, epoch: int, batches: Iterator[tuple[Any, torch.Tensor]]) -> EpochStats:
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        lr = self.optimizer.param_groups[0]["lr"]
        for inputs, labels in batches:
            batch_loss, batch_correct = self.step(inputs, labels)
            loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(labels)
            self.bar.update()
            self.bar.set_postfix(epoch=f"{epoch}/{self.epochs}", loss=f"{loss_sum / seen:.4f}",
                                 acc=f"{100 * correct / seen:.1f}")
        return EpochStats(epoch, loss_sum / seen, 100.0 * correct / seen, lr, time.perf_counter() - start)


class _Best:
    """The best epoch's weights so far: higher held-out accuracy, then lower held-out loss."""

    def __init__(self) -> None:
        self.key: tuple[float, float] | None = None
        self.epoch = 0
        self.state: dict[str, torch.Tensor] = {}

    def offer(self, epoch: int, accuracy: float, loss: float, learner: Learner) -> None:
        if self.key is None or (accuracy, -loss) > self.key:
            self.key, self.epoch = (accuracy, -loss), epoch
            self.state = copy.deepcopy(learner.state_dict())


@torch.no_grad()
def score(learner: Learner, data: CachedSet, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy %, mean loss) of the learner on a set's first view, in eval mode (no dropout)."""
    learner.eval()
    n, loss_sum, correct = len(data.labels), 0.0, 0
    for idx in torch.arange(n).split(batch_size):
        inputs, labels = data.batch(idx, torch.zeros_like(idx))
        loss, logits = learner.loss(inputs, labels)
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(-1).cpu() == labels.cpu()).sum())
    return 100.0 * correct / n, loss_sum / n


def train_learner(learner: Learner, data: CachedSet, cfg: TrainConfig,
                  held_out: CachedSet | None = None) -> list[EpochStats]:
    """Train `learner` on `data` under `cfg`; with `held_out`, end on the weights of its best epoch."""
    seed_everything(cfg.seed, cfg.deterministic)
    n = len(data.labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = total_steps(cfg, steps_per_epoch)
    epochs = math.ceil(total / steps_per_epoch)
    run = _Run(learner.train(), cfg, steps_per_epoch, epochs)
    generator = torch.Generator().manual_seed(cfg.seed)
    history, best, done = [], _Best(), 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        view = torch.randint(data.views, (n,), generator=generator)
        chunks = order.split(cfg.batch_size)[: total - done]
        done += len(chunks)
        stats = run.epoch(epoch, (data.batch(idx, view[idx]) for idx in chunks))
        if held_out is not None:
            accuracy, loss = score(learner, held_out)
            best.offer(epoch, accuracy, loss, learner)
            stats = replace(stats, held_out=accuracy, held_out_loss=loss)
            learner.train()
        log.info("epoch %d: loss %.4f, train acc %.2f%%, lr %.2e, %.2fs, held-out acc %s (loss %s)",
                 *vars(stats).values())
        history.append(stats)
    run.bar.close()
    if best.key is not None:
        learner.load_state_dict(best.state)
        log.info("kept epoch %d of %d (held-out accuracy %.2f%%)", best.epoch, epochs, best.key[0])
    learner.eval()
    return history


def selected_epoch(history: list[EpochStats]) -> int:
    """The epoch whose weights a run kept: the best held-out one, else the last (as `train_learner` picks)."""
    scored = [(s.held_out, -s.held_out_loss, s.epoch) for s in history
              if s.held_out is not None and s.held_out_loss is not None]
    if not scored:
        return history[-1].epoch
    return max(scored, key=lambda t: t[:2])[2]  # the first of equals, as _Best keeps it
