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

from service.bonder import TGPTModel
from service.tgpt import group_logits

if TYPE_CHECKING:
    from service.backbone import Backbone


class ImageNeed(enum.Enum):
    SHARED = "shared"  # the plain image forward, shared by every task that leaves the image tower untouched
    SHARED_TOKENS = "shared+tokens"  # the same forward, with its projected tokens as well
    PROMPTED = "prompted"  # a forward of its own, with the task's vision prompts in the image tower


@dataclass(frozen=True)
class ImageRows:
    """What the image forward gave for a task's images: L2-normalized features [B, D] (CPU); from a forward
    with tokens also the raw pooled features [B, D] and projected tokens [B, T, d] (on the backbone's device)."""

    features: torch.Tensor
    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


class TaskHead(Protocol):
    need: ClassVar[ImageNeed]

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        """Logits [B, C] for each (head, rows) pair; every head in `items` is of this class."""
        ...


def _scaled_cosines(items: Sequence[tuple[TextSideHead | VisionSideHead, ImageRows]],
                    backbone: Backbone) -> list[torch.Tensor]:
    scale = backbone.logit_scale
    return [scale * rows.features @ head.text_features.T for head, rows in items]


@dataclass(frozen=True)
class TextSideHead:
    """Zero-shot, CoOp, QPrompt, RLP: class text features cached at activation, the shared image forward."""

    need: ClassVar[ImageNeed] = ImageNeed.SHARED
    text_features: torch.Tensor  # [C, D], L2-normalized

    @classmethod
    def score(cls, items: Sequence[tuple[TextSideHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        return _scaled_cosines(items, backbone)


@dataclass(frozen=True)
class VisionSideHead:
    """MaPLe, QMaPLe: class text features cached at activation (with the deep text prompts), and an image
    forward of its own with the merged vision prompts; rows of several such tasks share one forward."""

    need: ClassVar[ImageNeed] = ImageNeed.PROMPTED
    text_features: torch.Tensor  # [C, D], L2-normalized
    vision_prompts: torch.Tensor  # [J, n, d_v], float32

    @classmethod
    def score(cls, items: Sequence[tuple[VisionSideHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        return _scaled_cosines(items, backbone)


@dataclass(frozen=True)
class ImageConditionedHead:
    """TGP-T: prompts generated per image from the shared forward's tokens by the task's Bonders; the rows of
    every such task in a micro-batch share two text-encoder calls (category, content). Nothing per class is
    cached but the head, inside `model`."""

    need: ClassVar[ImageNeed] = ImageNeed.SHARED_TOKENS
    model: TGPTModel

    @classmethod
    def score(cls, items: Sequence[tuple[ImageConditionedHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        with torch.inference_mode():
            logits = group_logits(backbone.text, [head.model for head, _ in items], [rows.tokens for _, rows in items],
                                  [rows.pooled for _, rows in items])
        return [block.float().cpu() for block in logits]
