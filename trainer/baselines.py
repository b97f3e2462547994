"""Baselines a prompt method has to beat, on frozen image features: a linear probe initialised from the zero-shot
classifier, Tip-Adapter's training-free cache model, a WiSE-FT-style blend of the probe with its zero-shot start,
and the world benchmark's centring control.

None of them is a bundle the service can serve today (the service scores class *text* features, and these
are per-class weights or a cache of training images), so the benchmarks score them in-process, on the same
cached clean image features the service's text kind scores (`service.serving.text_features`). A class a head
was not trained on (base-to-novel's novel classes) falls back to its zero-shot text feature: on novel classes
the probe, its blend and Tip-Adapter are exactly zero-shot CLIP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ZeroShot = Callable[[tuple[str, ...]], torch.Tensor]  # class names → normalized zero-shot text features [C, D]


@dataclass(frozen=True)
class LinearHead:
    """logit_scale · f · Wᵀ over normalized image features f; classes outside `classnames` use zero-shot rows."""

    classnames: tuple[str, ...]
    weights: torch.Tensor  # [C, D]
    logit_scale: float
    zero_shot: ZeroShot

    def logits(self, features: torch.Tensor, classnames: tuple[str, ...]) -> torch.Tensor:
        return self.logit_scale * features @ class_rows(self.classnames, self.weights, classnames, self.zero_shot).T

    @property
    def parameters(self) -> int:
        return self.weights.numel()


def class_rows(trained: tuple[str, ...], weights: torch.Tensor, wanted: tuple[str, ...],
               zero_shot: ZeroShot) -> torch.Tensor:
    """Rows of `weights` for the wanted classes it has, zero-shot features for the others, in `wanted` order."""
    index = {name: i for i, name in enumerate(trained)}
    missing = tuple(c for c in wanted if c not in index)
    fallback = dict(zip(missing, zero_shot(missing), strict=True)) if missing else {}
    return torch.stack([weights[index[c]] if c in index else fallback[c] for c in wanted])


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, logit_scale: float,
                     steps: int = 100, lr: float = 3e-4, weight_decay: float = 1e-4, seed: int = 1) -> torch.Tensor:
    """W [C, D] from the zero-shot classifier `init`, trained full-batch (AdamW, cosine) by cross-entropy over
    logit_scale · f · Wᵀ, one random view per image per step (features [N, K, D]). The steps and lr were chosen on
    the procedural world's validation split (docs/base_to_novel.md): longer or faster runs drift far from the
    zero-shot start and lose accuracy."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(init.clone().float())
    optimizer = torch.optim.AdamW([weights], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    rows = torch.arange(len(labels))
    for _ in range(steps):
        view = torch.randint(features.shape[1], (len(labels),), generator=generator)
        loss = F.cross_entropy(logit_scale * features[rows, view] @ weights.T, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return weights.detach()


def wise_ft(head: LinearHead, init: torch.Tensor, alpha: float = 0.5) -> LinearHead:
    """WiSE-FT's weight-space ensemble: (1 − α)·zero-shot + α·fine-tuned (α = 0.5, as TGP-T's reference reports)."""
    return LinearHead(head.classnames, (1 - alpha) * init + alpha * head.weights, head.logit_scale, head.zero_shot)


@dataclass(frozen=True)
class TipAdapter:
    """Tip-Adapter (Zhang et al., 2022), training-free: zero-shot logits + α · exp(−β(1 − f·Kᵀ)) · L, the keys K the
    shots' features (mean of their views), the values L their one-hot labels; a class without shots gets no cache."""

    classnames: tuple[str, ...]
    keys: torch.Tensor  # [N, D]
    labels: torch.Tensor  # [N]
    alpha: float
    beta: float
    logit_scale: float
    zero_shot: ZeroShot

    def logits(self, features: torch.Tensor, classnames: tuple[str, ...]) -> torch.Tensor:
        text = self.zero_shot(classnames)
        index = {name: i for i, name in enumerate(classnames)}
        column = torch.tensor([index.get(name, -1) for name in self.classnames])[self.labels]  # -1: not scored
        values = torch.zeros(len(self.labels), len(classnames))
        keep = column >= 0
        values[torch.nonzero(keep).flatten(), column[keep]] = 1.0
        affinity = torch.exp(-self.beta * (1 - features @ self.keys.T))
        return self.logit_scale * features @ text.T + self.alpha * affinity @ values

    @property
    def parameters(self) -> int:
        return 0  # training-free; it stores the shots' features


TIP_ALPHAS = tuple(0.25 * i for i in range(1, 17))  # 0.25 .. 4
TIP_BETAS = tuple(0.5 * i for i in range(1, 15))  # 0.5 .. 7


def tip_adapter(features: torch.Tensor, labels: torch.Tensor, classnames: tuple[str, ...], logit_scale: float,
                zero_shot: ZeroShot, held_out: int = 0) -> TipAdapter:
    """A Tip-Adapter on the shots' features [N, K, D]. With `held_out` > 0 shots per class, α and β are searched
    (as the reference searches them on validation data) on those shots against a cache of the others; the final
    cache holds every shot. Without, the reference's initial α = 1, β = 1."""
    keys = F.normalize(features.mean(dim=1), dim=-1)
    alpha, beta = 1.0, 1.0
    if held_out:
        test = _last_per_class(labels, held_out)
        cache = ~test
        probe = TipAdapter(classnames, keys[cache], labels[cache], 0.0, 0.0, logit_scale, zero_shot)
        accuracy = {(a, b): _tip_accuracy(probe, a, b, features[test, 0], labels[test], classnames)
                    for a in TIP_ALPHAS for b in TIP_BETAS}
        alpha, beta = max(accuracy, key=lambda ab: (accuracy[ab], -ab[0]))  # ties: the smaller cache weight
    return TipAdapter(classnames, keys, labels, alpha, beta, logit_scale, zero_shot)


def _tip_accuracy(probe: TipAdapter, alpha: float, beta: float, features: torch.Tensor, labels: torch.Tensor,
                  classnames: tuple[str, ...]) -> float:
    tip = TipAdapter(probe.classnames, probe.keys, probe.labels, alpha, beta, probe.logit_scale, probe.zero_shot)
    return float((tip.logits(features, classnames).argmax(-1) == labels).float().mean())


def _last_per_class(labels: torch.Tensor, count: int) -> torch.Tensor:
    """A mask of the last `count` images of each class (leaving at least one in the cache)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        rows = torch.nonzero(labels == label).flatten()
        mask[rows[len(rows) - min(count, len(rows) - 1):]] = True
    return mask


@dataclass(frozen=True)
class Centring:
    """Training-free control: zero-shot text features, image features centred on the shots' mean feature."""

    centre: torch.Tensor  # [D]
    logit_scale: float
    zero_shot: ZeroShot

    def logits(self, features: torch.Tensor, classnames: tuple[str, ...]) -> torch.Tensor:
        return self.logit_scale * F.normalize(features - self.centre, dim=-1) @ self.zero_shot(classnames).T

    @property
    def parameters(self) -> int:
        return 0
