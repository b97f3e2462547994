"""CoOp (Zhou et al., 2022): one learned context shared by every class, "<ctx> {class}.", or one per class
(class-specific context, CSC: [C, n_ctx, d], each class's row starting from the same phrase, or from its own
N(0, init_std) draw without one)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from service.core.backbone import Backbone
from service.methods.coop import CoOpConfig
from trainer.methods.base import EXPORT_DTYPES, PromptLearner, initial_context


class CoOp(PromptLearner):
    method = "coop"
    config: CoOpConfig

    def __init__(self, config: CoOpConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        ctx = initial_context(config, backbone)
        if config.class_specific:
            self.layout = dataclasses.replace(self.layout, class_specific=True)
            ctx = (ctx.expand(len(self.classnames), -1, -1).clone() if config.ctx_init
                   else torch.randn(len(self.classnames), *ctx.shape) * config.init_std)
        self.ctx = nn.Parameter(ctx)

    def context(self) -> torch.Tensor:
        return self.ctx

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()}
