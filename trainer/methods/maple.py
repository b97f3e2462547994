"""MaPLe (Khattak et al., 2023): deep text prompts coupled to deep vision prompts, J layers deep.

Text prompts P_0..P_{J-1} [n_ctx, d_t]: P_0 is the context spliced at the embedding (initialized from the
first n_ctx words of `ctx_init`; the remaining words stay frozen text, so "a photo of a" with n_ctx 2 gives
[SOT, ctx(2), of, a, {class}, ., EOT]); P_1.. replace the context rows' hidden states before text blocks
1..J-1. Vision prompts are V_i = coupling_i(P_i), one Linear(d_t → d_v) per depth (the deep ones start as
copies of one Linear, as the reference builds them). Both towers run through the service's own functions
(`PromptTextEncoder`, `service.core.vision_prompts`), so the exported bundle reproduces training's logits.
The export is *merged*: the couplings are applied once and only [J, n, d] prompts per tower are stored.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from service.core.backbone import Backbone
from service.core.vision_prompts import prompted_features
from service.methods.maple import MaPLeConfig
from trainer.data import Sample
from trainer.features import CLEAN, CachedSet, Views, fresh_set
from trainer.methods.base import EXPORT_DTYPES, PromptLearner

log = logging.getLogger(__name__)


def usable_depth(requested: int, backbone: Backbone) -> int:
    """The requested depth, clamped (with a log line saying so) to the shallower tower's number of blocks."""
    limit = backbone.sizes.deep_prompt_depth
    if requested > limit:
        log.warning("MaPLe depth %d exceeds this backbone's %d layers (the shallower tower); using depth %d",
                    requested, limit, limit)
    return min(requested, limit)


def split_init(config: MaPLeConfig) -> tuple[str | None, str]:
    """(learned words, frozen words) of `ctx_init`: the first n_ctx words become the context."""
    if not config.ctx_init:
        return None, ""
    words = config.ctx_init.split()
    return " ".join(words[: config.n_ctx]), " ".join(words[config.n_ctx :])


class MaPLe(PromptLearner):
    method = "maple"
    config: MaPLeConfig

    def __init__(self, config: MaPLeConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        d_t, d_v = backbone.text.width, backbone.sizes.vision_width
        if d_v is None:
            raise ValueError(f"{self.method} cannot run on this backbone: {backbone.sizes.token_prompts}")
        self.depth = usable_depth(config.depth, backbone)
        ctx_text, self.fixed_text = split_init(config)
        self.tokens = backbone.text.class_prompt_tokens(self.classnames, self.layout, self.fixed_text)
        ctx = (backbone.text.phrase_embeddings(ctx_text, config.n_ctx) if ctx_text
               else torch.randn(config.n_ctx, d_t) * config.init_std)
        deep = [torch.randn(config.n_ctx, d_t) * config.deep_std for _ in range(self.depth - 1)]
        self.text_params = nn.ParameterList([nn.Parameter(p) for p in [ctx, *deep]])
        deep_coupling = nn.Linear(d_t, d_v)
        self.couplings = nn.ModuleList([nn.Linear(d_t, d_v)] + [copy.deepcopy(deep_coupling) for _ in deep])

    @property
    def coupling_layers(self) -> list[nn.Linear]:
        """`couplings` typed as what they hold (an nn.ModuleList types its items as plain modules)."""
        return [cast(nn.Linear, c) for c in self.couplings]

    # Quantized variants override these two: what each forward uses in place of the float weights.
    def text_prompt(self, i: int) -> torch.Tensor:
        return self.text_params[i]

    def coupling_weight(self, i: int) -> torch.Tensor:
        return self.coupling_layers[i].weight

    def text_prompts(self) -> torch.Tensor:
        """[J, n, d_t]: row 0 the context, rows 1.. the deep text prompts."""
        return torch.stack([self.text_prompt(i) for i in range(self.depth)])

    def vision_prompts(self) -> torch.Tensor:
        """[J, n, d_v]: each text prompt through its coupling."""
        return torch.stack([F.linear(self.text_prompt(i), self.coupling_weight(i), self.coupling_layers[i].bias)
                            for i in range(self.depth)])

    def context(self) -> torch.Tensor:
        return self.text_prompt(0)

    def text_features(self) -> torch.Tensor:
        prompts = self.text_prompts()
        features = self.backbone.text.encode_tokens(self.tokens, prompts[0], deep=prompts[1:])
        return F.normalize(features.float(), dim=-1)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return prompted_features(self.backbone.model.visual, pixels.to(self.backbone.device), self.vision_prompts())

    def training_set(self, samples: list[Sample], descriptions: list[str | None], views: Views = CLEAN,
                     progress: bool = False) -> CachedSet:
        """Images run through the prompted tower (forward and backward) every step: clean at one view, else a
        fresh augmentation every step (the tower changes as it trains, so no view can be cached)."""
        return fresh_set(self.backbone, samples, views, lambda pixels, idx: self.image_features(pixels))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        dtype = EXPORT_DTYPES[self.config.export_dtype]
        with torch.no_grad():
            return {"text_prompts": self.text_prompts().to(dtype).cpu(),
                    "vision_prompts": self.vision_prompts().to(dtype).cpu()}

    def export_options(self) -> dict[str, Any]:
        options = super().export_options()
        width = self.backbone.sizes.vision_width
        return options | {"depth": self.depth, "vision_width": width, "fixed_text": self.fixed_text}

    def full_form_values(self) -> dict[str, int]:
        """Values of the unmerged model: prompts, coupling weight matrices, coupling biases."""
        return {"prompts": sum(p.numel() for p in self.text_params),
                "coupling_weights": sum(c.weight.numel() for c in self.coupling_layers),
                "coupling_biases": sum(c.bias.numel() for c in self.coupling_layers)}
