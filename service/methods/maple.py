"""MaPLe (Khattak et al., 2023): deep text prompts coupled to deep vision prompts, J layers deep.

The bundle stores the merged form: the text prompts [J, n, d_t] (row 0 is the context at the embedding, rows
1..J-1 replace the context rows' hidden states before text blocks 1..J-1) and the vision prompts [J, n, d_v]
(each text prompt through its coupling, applied once at export). A MaPLe task needs its own image forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.core.records import MAX_CLASSNAME_CHARS, MAX_PROMPT_DEPTH, MAX_VISION_WIDTH, BackboneSizes
from service.methods.common import EXPORT_DTYPE_NAMES, PromptConfig, check_export_dtype
from service.methods.spec import (
    FLOAT_DTYPES,
    HALF_OR_FULL,
    BundleError,
    ClassPrompt,
    Decoded,
    Described,
    Kind,
    MethodSpec,
    TensorRule,
)

if TYPE_CHECKING:
    import torch

    from service.core.text_encoder import PromptTextEncoder


class MapleOptions(BaseModel):
    """Deep prompts: `depth` J layers of `prompt.n_ctx` tokens; `fixed_text` follows the context as plain text."""

    model_config = ConfigDict(strict=True, extra="allow")

    depth: Annotated[int, Field(ge=1, le=MAX_PROMPT_DEPTH)]
    vision_width: Annotated[int, Field(ge=1, le=MAX_VISION_WIDTH)]
    fixed_text: Annotated[str, StringConstraints(max_length=MAX_CLASSNAME_CHARS)] = ""


@dataclass
class MaPLeConfig(PromptConfig):
    n_ctx: int = field(default=2, metadata={"help": "prompt tokens per layer and tower"})
    depth: int = field(default=9, metadata={"help": "J: layers that get prompts (clamped to the towers' depth)"})
    deep_std: float = field(default=0.02, metadata={"help": "std of the deep text prompts' N(0, std) init"})
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the merged prompts",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.depth < 1:
            raise ValueError(f"depth must be ≥ 1, got {self.depth}")
        if self.class_token_position != "end":
            raise ValueError("MaPLe puts the class name after the context: class_token_position must be 'end'")
        if self.ctx_init and len(self.ctx_init.split()) < self.n_ctx:
            raise ValueError(f"ctx_init {self.ctx_init!r} has fewer than n_ctx={self.n_ctx} words")
        check_export_dtype(self.export_dtype)


# The reference's base-to-novel recipe (muzairkhattak/multimodal-prompt-learning
# `configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml`): SGD lr 0.0035, batch 4, 5 epochs, cosine, 1 constant
# warm-up epoch at 1e-5, a fresh random resized crop + flip every step. (Cross-dataset: depth 3, lr 0.0026, 2 epochs.)
MAPLE_TRAIN_DEFAULTS = {"lr": 0.0035, "batch_size": 4, "epochs": 5, "views": 0}


def maple_shapes(b: Described[MapleOptions]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(text prompts [J, n, d_t], vision prompts [J, n, d_v]) of a deep-prompt bundle."""
    depth, n = b.options.depth, b.prompt.n_ctx
    return (depth, n, b.prompt.ctx_dim), (depth, n, b.options.vision_width)


DeepOptions = TypeVar("DeepOptions", bound=MapleOptions)


class DeepPromptSpec(MethodSpec[DeepOptions]):
    """What MaPLe and its quantized form share: the layout, the vision prompts and the backbone checks."""

    kind = Kind.VISION
    uses_context = True

    def check(self, b: Described[DeepOptions]) -> None:
        super().check(b)
        if b.prompt.class_specific or b.prompt.class_token_position != "end":
            raise BundleError("prompt.class_token_position", f"method {self.name!r} needs a shared context at 'end'")

    def text_prompts(self, b: Decoded[DeepOptions]) -> torch.Tensor:
        """Float32 [J, n, d_t]: row 0 the context, rows 1.. the deep text prompts."""
        return b.tensors["text_prompts"].float()

    def class_prompt(self, b: Decoded[DeepOptions], text: PromptTextEncoder | None = None) -> ClassPrompt:
        prompts = self.text_prompts(b)
        return ClassPrompt(prompts[0], prompts[1:], b.options.fixed_text)

    def vision_prompts(self, b: Decoded[DeepOptions]) -> torch.Tensor:
        return b.tensors["vision_prompts"].float()

    def prompt_values(self, b: Described[DeepOptions]) -> int:
        text, vision = maple_shapes(b)
        return super().prompt_values(b) + math.prod(text[1:]) * (text[0] - 1) + math.prod(vision)

    def check_backbone(self, b: Described[DeepOptions], sizes: BackboneSizes) -> None:
        """The deep prompts must fit both towers' depth and the image tower's width."""
        if sizes.token_prompts is not None:
            raise BundleError("method", f"{self.name} cannot run on this backbone: {sizes.token_prompts}")
        if b.options.depth > sizes.deep_prompt_depth:
            raise BundleError("options.depth", f"is {b.options.depth}, this backbone allows at most "
                              f"{sizes.deep_prompt_depth}")
        if b.options.vision_width != sizes.vision_width:
            raise BundleError("options.vision_width",
                              f"is {b.options.vision_width}, the image width is {sizes.vision_width}")


class MaPLeSpec(DeepPromptSpec[MapleOptions]):
    name = "maple"
    options_model = MapleOptions
    config = MaPLeConfig
    learner = "trainer.methods.maple:MaPLe"
    train_defaults = MAPLE_TRAIN_DEFAULTS

    def tensor_rules(self, b: Described[MapleOptions]) -> dict[str, TensorRule]:
        text, vision = maple_shapes(b)
        return {"text_prompts": TensorRule(text, FLOAT_DTYPES), "vision_prompts": TensorRule(vision, HALF_OR_FULL)}


SPEC = MaPLeSpec()
