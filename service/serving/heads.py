"""Task heads, one per method kind: what a task needs from the image forward, and how it turns that into logits.

A task's head is built once at activation from its bundle (`build_head`, by the method's `Kind`). Its `forward`
tells the runtime which image forward its rows go through; its class's `score` turns the rows of every task of
that kind in a micro-batch into logits at once, so a kind that can share work across tasks (one text-encoder
call for all image-conditioned rows) does so. Adding a kind is one head class here and one `HEADS` entry.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from service.bundle.codec import Bundle
from service.core.backbone import Backbone
from service.core.bonder import TGPTModel, group_logits
from service.methods import BundleError, Kind
from service.serving.text_features import text_features


class ImageForward(enum.Enum):
    """The image forwards the runtime runs for a micro-batch."""

    PLAIN = "plain"  # shared by every task that leaves the image tower untouched
    PLAIN_WITH_TOKENS = "plain+tokens"  # the same forward, with its projected tokens as well
    PROMPTED = "prompted"  # a forward of its own, with the task's vision prompts in the image tower


@dataclass(frozen=True)
class ImageRows:
    """What the image forward gave for a task's images: L2-normalized features [B, D] (CPU); from a forward
    with tokens also the raw pooled features [B, D] and projected tokens [B, T, d] (on the backbone's device)."""

    features: torch.Tensor
    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


class TaskHead(Protocol):
    forward: ClassVar[ImageForward]
    # True: `score` gives logits over classes (answered as probabilities); False: features, answered as they are
    scores_classes: ClassVar[bool]
    # True: built around class text features [C, D], which `build` takes ready-made (a stored artefact) if given
    caches_text_features: ClassVar[bool]

    @property
    def vision_prompts(self) -> torch.Tensor | None:
        """[J, n, d_v] prompts of a PROMPTED forward; None for the others."""
        ...

    @classmethod
    def build(cls, bundle: Bundle, backbone: Backbone, text_features: torch.Tensor | None = None) -> TaskHead:
        """The head of a decoded, compatible bundle (raises BundleError if it cannot serve); `text_features`, when
        given, are the bundle's class text features computed before (checked by the caller)."""
        ...

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        """Logits [B, C] for each (head, rows) pair; every head in `items` is of this class."""
        ...


def checked_text_features(bundle: Bundle, backbone: Backbone, stored: torch.Tensor | None = None) -> torch.Tensor:
    """`stored`, or `text_features` computed now, refused when not finite: finite inputs can still overflow inside
    the encoder, and such a bundle would answer null probabilities."""
    features = stored if stored is not None else text_features(bundle, backbone)
    if not torch.isfinite(features).all():
        raise BundleError("tensors", "the bundle's text features are not finite (its values overflow the encoder)")
    return features


def _scaled_cosines(items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
    scale = backbone.logit_scale
    return [scale * rows.features @ _text_features(head).T for head, rows in items]


def _text_features(head: TaskHead) -> torch.Tensor:
    assert isinstance(head, TextSideHead | VisionSideHead)
    return head.text_features


@dataclass(frozen=True)
class TextSideHead:
    """Zero-shot, CoOp, QPrompt, RLP: class text features cached at activation, the shared image forward."""

    forward: ClassVar[ImageForward] = ImageForward.PLAIN
    scores_classes: ClassVar[bool] = True
    caches_text_features: ClassVar[bool] = True
    text_features: torch.Tensor  # [C, D], L2-normalized
    vision_prompts: None = None

    @classmethod
    def build(cls, bundle: Bundle, backbone: Backbone, text_features: torch.Tensor | None = None) -> TextSideHead:
        return cls(checked_text_features(bundle, backbone, text_features))

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        return _scaled_cosines(items, backbone)


@dataclass(frozen=True)
class VisionSideHead:
    """MaPLe, QMaPLe: class text features cached at activation (with the deep text prompts), and an image
    forward of its own with the merged vision prompts; rows of several such tasks share one forward."""

    forward: ClassVar[ImageForward] = ImageForward.PROMPTED
    scores_classes: ClassVar[bool] = True
    caches_text_features: ClassVar[bool] = True
    text_features: torch.Tensor  # [C, D], L2-normalized
    vision_prompts: torch.Tensor  # [J, n, d_v], float32

    @classmethod
    def build(cls, bundle: Bundle, backbone: Backbone, text_features: torch.Tensor | None = None) -> VisionSideHead:
        prompts = bundle.vision_prompts()
        if prompts is None:
            raise BundleError("method", f"method {bundle.manifest.method!r} declares no vision prompts")
        return cls(checked_text_features(bundle, backbone, text_features), prompts)

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        return _scaled_cosines(items, backbone)


@dataclass(frozen=True)
class ImageConditionedHead:
    """TGP-T: prompts generated per image from the shared forward's tokens by the task's Bonders; the rows of
    every such task in a micro-batch share two text-encoder calls (category, content). Nothing per class is
    cached but the head, inside `model`."""

    forward: ClassVar[ImageForward] = ImageForward.PLAIN_WITH_TOKENS
    scores_classes: ClassVar[bool] = True
    caches_text_features: ClassVar[bool] = False
    model: TGPTModel
    vision_prompts: None = None

    @classmethod
    def build(cls, bundle: Bundle, backbone: Backbone, text_features: torch.Tensor | None = None
              ) -> ImageConditionedHead:
        return cls(bundle.image_model().to(backbone.device))

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        models, tokens, pooled = [], [], []
        for head, rows in items:
            assert isinstance(head, ImageConditionedHead) and rows.tokens is not None and rows.pooled is not None
            models.append(head.model)
            tokens.append(rows.tokens)
            pooled.append(rows.pooled)
        with torch.inference_mode():
            logits = group_logits(backbone.text, models, tokens, pooled)
        return [block.float().cpu() for block in logits]


@dataclass(frozen=True)
class EmbeddingHead:
    """No task: the shared forward's L2-normalized image features themselves (`POST /v1/embeddings`), so image
    embeddings ride the same micro-batches and image forward as classification."""

    forward: ClassVar[ImageForward] = ImageForward.PLAIN
    scores_classes: ClassVar[bool] = False
    caches_text_features: ClassVar[bool] = False
    vision_prompts: None = None

    @classmethod
    def build(cls, bundle: Bundle, backbone: Backbone, text_features: torch.Tensor | None = None) -> EmbeddingHead:
        return cls()  # nothing comes from a bundle

    @classmethod
    def score(cls, items: Sequence[tuple[TaskHead, ImageRows]], backbone: Backbone) -> list[torch.Tensor]:
        return [rows.features for _, rows in items]


HEADS: dict[Kind, type[TextSideHead] | type[VisionSideHead] | type[ImageConditionedHead]] = {
    Kind.TEXT: TextSideHead,
    Kind.VISION: VisionSideHead,
    Kind.IMAGE_CONDITIONED: ImageConditionedHead,
}


def head_class(bundle: Bundle) -> type[TextSideHead] | type[VisionSideHead] | type[ImageConditionedHead]:
    """The head class of the bundle's method kind."""
    return HEADS[bundle.spec.kind]


def build_head(bundle: Bundle, backbone: Backbone) -> TaskHead:
    """The head of the bundle's method kind, its class text features (if any) computed now."""
    return head_class(bundle).build(bundle, backbone)


def held_bytes(head: TaskHead) -> int:
    """The memory a head holds in tensors (its features, prompts and any model's parameters and buffers)."""
    tensors = [value for value in vars(head).values() if isinstance(value, torch.Tensor)]
    if isinstance(head, ImageConditionedHead):
        tensors += [*head.model.parameters(), *head.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
