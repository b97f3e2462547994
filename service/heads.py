"""Task kinds: what a task needs from the image forward, and how it turns that into class logits.

A task's head is built once at activation from its bundle. Its `need` tells the runtime which image forward
its rows go through; its class's `score` turns the rows of every task of that kind in a micro-batch into
logits at once, so a kind that can share work across tasks (one text-encoder call for all image-conditioned
rows, say) does so. Adding a kind is one head class here and one entry in `service.tasks.HEAD_BUILDERS`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from service.backbone import Backbone


class ImageNeed(enum.Enum):
    SHARED = "shared"  # the plain image forward, shared by every task that leaves the image tower untouched
    SHARED_TOKENS = "shared+tokens"  # the same forward, with its projected tokens as well
    PROMPTED = "prompted"  # a forward of its own, with the task's vision prompts in the image tower


@dataclass(frozen=True)
class ImageRows:
    """What the image forward gave for a task's images: L2-normalized features [B, D], tokens [B, T, d]."""

    features: torch.Tensor
    tokens: torch.Tensor | None = None


class TaskHead(Protocol):
    need: ClassVar[ImageNeed]

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        """Logits [B, C] for each (head, rows) pair; every head in `items` is of this class."""
        ...


@dataclass(frozen=True)
class TextSideHead:
    """Zero-shot, CoOp, QPrompt, RLP: class text features cached at activation, the shared image forward."""

    need: ClassVar[ImageNeed] = ImageNeed.SHARED
    text_features: torch.Tensor  # [C, D], L2-normalized

    @classmethod
    def score(cls, items: Sequence[tuple[TextSideHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        scale = backbone.logit_scale
        return [scale * rows.features @ head.text_features.T for head, rows in items]
