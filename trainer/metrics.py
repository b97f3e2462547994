"""Accuracy metrics: top-1, per-class accuracy, and the base-to-novel harmonic mean."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    per_class: tuple[float, ...]  # percent per label; NaN for a class with no samples
    count: int

    def as_dict(self, classnames: tuple[str, ...] | None = None) -> dict:
        names = classnames or tuple(str(i) for i in range(len(self.per_class)))
        return {"top1": self.top1, "count": self.count, "per_class": dict(zip(names, self.per_class, strict=True))}


def top1(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Percent of predictions equal to their target."""
    if targets.numel() == 0:
        raise ValueError("top-1 accuracy of an empty set is undefined")
    return 100.0 * (predictions == targets).float().mean().item()


def per_class_accuracy(predictions: torch.Tensor, targets: torch.Tensor, n_classes: int) -> tuple[float, ...]:
    """Percent correct per class (NaN where a class has no samples)."""
    out = []
    for c in range(n_classes):
        mask = targets == c
        out.append(100.0 * (predictions[mask] == c).float().mean().item() if mask.any() else float("nan"))
    return tuple(out)


def accuracy(predictions: torch.Tensor, targets: torch.Tensor, n_classes: int) -> Accuracy:
    return Accuracy(top1(predictions, targets), per_class_accuracy(predictions, targets, n_classes), len(targets))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2·B·N / (B + N), the base-to-novel summary number (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
