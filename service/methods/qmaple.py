"""QMaPLe (QPrompt on MaPLe): the text prompts stored b-bit packed, with one codebook and (μ, σ) per depth row
(one quantizer per tensor, as trained); the vision prompts merged from the quantized prompts and couplings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.core.bitpack import dequantize
from service.methods.common import Bits, QuantizerConfig
from service.methods.maple import MAPLE_TRAIN_DEFAULTS, DeepPromptSpec, MaPLeConfig, MapleOptions, maple_shapes
from service.methods.qprompt import quantized_rules
from service.methods.spec import HALF_OR_FULL, Decoded, Described, TensorRule

if TYPE_CHECKING:
    import torch


class QMapleOptions(MapleOptions):
    bits: Bits


@dataclass
class QMaPLeConfig(MaPLeConfig):
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(bits=4),
                                       metadata={"help": "bits (default 4), t, T_KL"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)


class QMaPLeSpec(DeepPromptSpec[QMapleOptions]):
    name = "qmaple"
    options_model = QMapleOptions
    config = QMaPLeConfig
    learner = "trainer.methods.qmaple:QMaPLe"
    train_defaults = MAPLE_TRAIN_DEFAULTS

    def tensor_rules(self, b: Described[QMapleOptions]) -> dict[str, TensorRule]:
        text, vision = maple_shapes(b)
        return quantized_rules(b.options.bits, text, groups=text[0]) | {"vision_prompts": TensorRule(vision,
                                                                                                     HALF_OR_FULL)}

    def text_prompts(self, b: Decoded[QMapleOptions]) -> torch.Tensor:
        t = b.tensors
        return dequantize(t["indices"], t["codebook"], t["mu"], t["sigma"], b.options.bits, maple_shapes(b)[0])


SPEC = QMaPLeSpec()
