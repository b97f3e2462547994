"""The shared prompt-learner base: a learned context spliced into class prompts of the frozen text tower.

A method is a config dataclass (in the torch-free `trainer.configs`) plus a `PromptLearner` subclass that says
how its context is produced (`context()`) and how it becomes bundle tensors (`export_tensors()`). Everything
else — text encoding, logits, the manifest — lives here once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from service import __version__
from service.backbone import Backbone
from service.bundle import METHODS as BUNDLE_METHODS
from service.bundle import Manifest, PromptLayout
from trainer.configs import EXPORT_DTYPE_NAMES, PromptConfig

log = logging.getLogger(__name__)

TRAINER_VERSION = f"promptserve-trainer {__version__}"
EXPORT_DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPE_NAMES}


def config_json(config: Any) -> dict[str, Any]:
    """A config dataclass as the plain JSON a manifest holds (tuples become lists)."""
    return json.loads(json.dumps(asdict(config)))


def text_init_context(backbone: Backbone, text: str, n_ctx: int) -> torch.Tensor:
    """Token embeddings of `text` ([n_ctx, d]); `n_ctx` must equal its token count."""
    ids = backbone.tokenizer.encode(text)
    if len(ids) != n_ctx:
        raise ValueError(f"ctx_init {text!r} is {len(ids)} tokens; set n_ctx to {len(ids)} or pick another text")
    embedding = backbone.text.tower.token_embedding
    return embedding(torch.tensor(ids, device=embedding.weight.device)).detach().float().cpu()


def initial_context(config: PromptConfig, backbone: Backbone, generator: torch.Generator | None = None) -> torch.Tensor:
    if config.ctx_init:
        return text_init_context(backbone, config.ctx_init, config.n_ctx)
    return torch.randn(config.n_ctx, backbone.text.width, generator=generator) * config.init_std


class PromptLearner(nn.Module):
    """Class features from a learned context; subclasses define `context()` and `export_tensors()`."""

    method: ClassVar[str]
    needs_image_tower: ClassVar[bool] = False

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
        return Manifest(
            method=self.method,
            backbone=self.backbone.ref(with_image=BUNDLE_METHODS[self.method].needs_image_fingerprint),
            classnames=self.classnames,
            prompt=self.layout,
            options=self.export_options(),
            metrics=metrics or {},
            trainer_version=TRAINER_VERSION,
        )

    def export(self, metrics: dict[str, Any] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """The bundle (manifest, tensors) that stands for this learner in the service."""
        return self.manifest(metrics), self.export_tensors()
