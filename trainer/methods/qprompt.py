"""QPrompt applied to CoOp's context (QCoOp): the context is trained quantization-aware and exported packed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.core.backbone import Backbone
from service.methods.qprompt import QPromptConfig
from trainer.methods.base import PromptLearner, initial_context
from trainer.methods.quantizer import KMeansQuantizer


class QPrompt(PromptLearner):
    method = "qprompt"
    config: QPromptConfig

    def __init__(self, config: QPromptConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        self.ctx = nn.Parameter(initial_context(config, backbone))
        self.quantizer = KMeansQuantizer(config.quantizer, self.ctx)

    def context(self) -> torch.Tensor:
        return self.quantizer(self.ctx)

    def after_step(self) -> None:
        self.quantizer.step(self.ctx)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return self.quantizer.export(self.ctx)

    def export_options(self) -> dict[str, Any]:
        options = super().export_options()
        options["bits"] = self.config.quantizer.bits
        options["reclusterings"] = self.quantizer.clusterings
        return options
