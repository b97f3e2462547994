"""QPrompt on CoOp's context (QCoOp, arXiv 2407.10704): the context trained quantization-aware and stored as
b-bit packed indices + a k-means codebook + (μ, σ), dequantized at activation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from service.core.bitpack import dequantize, packed_size
from service.methods.common import Bits, PromptConfig, QuantizerConfig
from service.methods.spec import HALF_OR_FULL, ClassPrompt, Decoded, Described, Kind, MethodSpec, TensorRule, ctx_shape

if TYPE_CHECKING:
    from service.core.text_encoder import PromptTextEncoder


class QPromptOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    bits: Bits


@dataclass
class QPromptConfig(PromptConfig):
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig, metadata={"help": "bits, t, T_KL"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)


def quantized_rules(bits: int, shape: tuple[int, ...], groups: int | None = None) -> dict[str, TensorRule]:
    """Packed indices of `shape` with one codebook and (μ, σ): QPrompt's tensors. With `groups` (QMaPLe: one per
    depth row) the codebook is [groups, 2^b] and μ, σ are [groups]."""
    return {
        "indices": TensorRule((packed_size(bits, math.prod(shape)),), ("U8",)),
        "codebook": TensorRule((2**bits,) if groups is None else (groups, 2**bits), HALF_OR_FULL),
        "mu": TensorRule((groups or 1,), ("F32",)),
        "sigma": TensorRule((groups or 1,), ("F32",)),
    }


class QPromptSpec(MethodSpec[QPromptOptions]):
    name = "qprompt"
    kind = Kind.TEXT
    options_model = QPromptOptions
    uses_context = True
    config = QPromptConfig
    learner = "trainer.methods.qprompt:QPrompt"

    def tensor_rules(self, b: Described[QPromptOptions]) -> dict[str, TensorRule]:
        return quantized_rules(b.options.bits, ctx_shape(b))

    def class_prompt(self, b: Decoded[QPromptOptions], text: PromptTextEncoder | None = None) -> ClassPrompt:
        t = b.tensors
        return ClassPrompt(dequantize(t["indices"], t["codebook"], t["mu"], t["sigma"], b.options.bits, ctx_shape(b)))


SPEC = QPromptSpec()
