"""CoOp (Zhou et al., 2022): one learned context shared by every class, "<ctx> {class}."."""

from __future__ import annotations

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
        self.ctx = nn.Parameter(initial_context(config, backbone))

    def context(self) -> torch.Tensor:
        return self.ctx

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()}
