"""What a learner is (`Learner`, the protocol the loops, evaluation and export use) and the shared base of the
context methods: a learned context spliced into class prompts of the frozen text tower.

A context method is a config (in its spec, `service.methods`) plus a `PromptLearner` subclass that says how its
context is produced (`context()`) and how it becomes bundle tensors (`export_tensors()`). Everything else —
text encoding, logits, the cached training set, the manifest — lives here once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from service import __version__
from service.bundle.manifest import Manifest, build_manifest
from service.core.backbone import Backbone
from service.core.records import PromptLayout
from service.methods.common import EXPORT_DTYPE_NAMES, PromptConfig
from trainer.data import Sample
from trainer.features import CLEAN, CachedSet, Views, encode_samples, fresh_set

log = logging.getLogger(__name__)

TRAINER_VERSION = f"promptserve-trainer {__version__}"
EXPORT_DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPE_NAMES}


def config_json(config: Any) -> dict[str, Any]:
    """A config dataclass as the plain JSON a manifest holds (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def initial_context(config: PromptConfig, backbone: Backbone, generator: torch.Generator | None = None) -> torch.Tensor:
    if config.ctx_init:
        return backbone.text.phrase_embeddings(config.ctx_init, config.n_ctx)
    return torch.randn(config.n_ctx, backbone.text.width, generator=generator) * config.init_std


class Learner(Protocol):
    """A method's learner, as the training loops, the run and the export use it (an nn.Module)."""

    method: ClassVar[str]

    def __init__(self, config: Any, backbone: Backbone, classnames: tuple[str, ...]) -> None: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def trainable_parameters(self) -> int: ...

    def training_set(self, samples: list[Sample], descriptions: list[str | None], views: Views = CLEAN,
                     progress: bool = False) -> CachedSet:
        """What the loop reads each step (image features or tokens, cached or encoded afresh)."""
        ...

    def loss(self, inputs: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, logits) of one batch."""
        ...

    def after_step(self) -> None:
        """Called after every optimizer step (QPrompt re-clusters here)."""
        ...

    def export(self, metrics: dict[str, Any] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """The bundle (manifest, tensors) that stands for this learner in the service."""
        ...


class PromptLearner(nn.Module):
    """Class features from a learned context; subclasses define `context()` and `export_tensors()`."""

    method: ClassVar[str]

    def __init__(self, config: PromptConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__()
        self.config = config
        self.classnames = tuple(classnames)
        self.layout = PromptLayout(config.n_ctx, backbone.text.width, config.class_token_position, False)
        # Held in a list so the frozen backbone is not registered as a submodule (nor saved, nor moved).
        self._backbone = [backbone]
        self.tokens = backbone.text.class_prompt_tokens(self.classnames, self.layout)

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    def context(self) -> torch.Tensor:
        """The [n_ctx, d] context this step uses (differentiable)."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The bundle tensors of this method (what the service reads back)."""
        raise NotImplementedError

    def export_options(self) -> dict[str, Any]:
        return {"trainer": config_json(self.config), "trainable_parameters": self.trainable_parameters()}

    def after_step(self) -> None:
        """Hook called after every optimizer step (QPrompt re-clusters here)."""

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalized image features of preprocessed pixels; methods that prompt the image tower override this."""
        return self.backbone.encode_images(pixels)

    def training_set(self, samples: list[Sample], descriptions: list[str | None], views: Views = CLEAN,
                     progress: bool = False) -> CachedSet:
        """Every image's features under `views.count` views, cached once (the image tower is frozen); at 0 views,
        encoded afresh from a new augmentation every step."""
        if views.count == 0:
            return fresh_set(self.backbone, samples, views, lambda pixels, idx: self.backbone.encode_images(pixels))
        return encode_samples(self.backbone, samples, views.count, views.seed, progress=progress,
                              crop_scale=views.crop_scale)

    def loss(self, image_features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, logits) of one batch: cross-entropy over the class logits."""
        logits = self(image_features)
        return F.cross_entropy(logits, labels), logits

    def text_features(self) -> torch.Tensor:
        """L2-normalized class features [C, D] for the current context."""
        features = self.backbone.text.encode_tokens(self.tokens, self.context())
        return F.normalize(features.float(), dim=-1)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """Logits logit_scale · cos(image, class) for normalized image features [B, D]."""
        return self.backbone.logit_scale * image_features @ self.text_features().T

    def manifest(self, metrics: dict[str, Any] | None = None) -> Manifest:
        return build_manifest(self.method, self.backbone, self.classnames, prompt=self.layout,
                              options=self.export_options(), metrics=metrics, trainer_version=TRAINER_VERSION)

    def export(self, metrics: dict[str, Any] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """The bundle (manifest, tensors) that stands for this learner in the service."""
        return self.manifest(metrics), self.export_tensors()
