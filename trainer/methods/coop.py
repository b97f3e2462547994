"""CoOp (Zhou et al., 2022): one learned context shared by every class, "<ctx> {class}."."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from service.backbone import Backbone
from trainer.methods.base import EXPORT_DTYPES, PromptConfig, PromptLearner, initial_context


@dataclass
class CoOpConfig(PromptConfig):
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the exported ctx",
                                                                  "choices": tuple(EXPORT_DTYPES)})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPES)}, got {self.export_dtype!r}")


class CoOp(PromptLearner):
    method = "coop"

    def __init__(self, config: CoOpConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        self.ctx = nn.Parameter(initial_context(config, backbone))

    def context(self) -> torch.Tensor:
        return self.ctx

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()}
