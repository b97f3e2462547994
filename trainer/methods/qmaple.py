"""QMaPLe (QPrompt on MaPLe): k-means QAT on every text prompt and every coupling weight matrix.

One `KMeansQuantizer` per tensor (J text prompts + J coupling matrices; the paper's 18 groups at J = 9),
each with constrained adaptive re-clustering as for QCoOp; coupling biases stay float. The bundle stores
the text prompts packed (b-bit indices, one codebook and (mu, sigma) per depth row, i.e. per quantized
tensor) and the vision prompts merged from the *quantized* prompts and couplings, so it reproduces
exactly what training computed.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from service.core.backbone import Backbone
from service.core.bitpack import pack_indices
from service.methods.qmaple import QMaPLeConfig
from trainer.methods.base import EXPORT_DTYPES
from trainer.methods.maple import MaPLe
from trainer.methods.quantizer import KMeansQuantizer


class QMaPLe(MaPLe):
    method = "qmaple"
    config: QMaPLeConfig

    def __init__(self, config: QMaPLeConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        self.text_quantizers = nn.ModuleList([KMeansQuantizer(config.quantizer, p) for p in self.text_params])
        self.coupling_quantizers = nn.ModuleList(
            [KMeansQuantizer(config.quantizer, c.weight) for c in self.coupling_layers])

    def text_prompt(self, i: int) -> torch.Tensor:
        return self.text_quantizers[i](self.text_params[i])

    def coupling_weight(self, i: int) -> torch.Tensor:
        return self.coupling_quantizers[i](self.coupling_layers[i].weight)

    def quantized_pairs(self) -> list[tuple[KMeansQuantizer, torch.Tensor]]:
        """(quantizer, float weight) of every quantized tensor: the text prompts first, then the couplings."""
        # the nn.ModuleLists hold KMeansQuantizers but type their items as plain modules
        quantizers = [cast(KMeansQuantizer, q) for q in [*self.text_quantizers, *self.coupling_quantizers]]
        weights = [*self.text_params, *(c.weight for c in self.coupling_layers)]
        return list(zip(quantizers, weights, strict=True))

    def after_step(self) -> None:
        for quantizer, weight in self.quantized_pairs():
            quantizer.step(weight)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        pairs = self.quantized_pairs()[: len(self.text_params)]  # the text prompts' pairs
        parts = [q.export(p) for q, p in pairs]
        indices = torch.cat([q.indices(p).reshape(-1) for q, p in pairs])
        with torch.no_grad():
            vision = self.vision_prompts().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()
        return {
            "indices": pack_indices(indices, self.config.quantizer.bits),
            "codebook": torch.stack([part["codebook"] for part in parts]),
            "mu": torch.cat([part["mu"] for part in parts]),
            "sigma": torch.cat([part["sigma"] for part in parts]),
            "vision_prompts": vision,
        }

    def export_options(self) -> dict[str, Any]:
        options = super().export_options()
        options["bits"] = self.config.quantizer.bits
        options["reclusterings"] = sum(q.clusterings for q, _ in self.quantized_pairs())
        return options
