"""Pieces several methods share: the trainer's prompt and quantizer configs, and option field types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.core.records import CLASS_TOKEN_POSITIONS, MAX_TEMPLATE_CHARS, ClassTokenPosition

EXPORT_DTYPE_NAMES = ("float16", "float32")  # torch dtypes of these names: trainer.methods.base.EXPORT_DTYPES

Bits = Annotated[int, Field(ge=1, le=8)]
# Exactly one `{}` and no other braces: templates are filled with str.replace, never str.format.
Template = Annotated[str, StringConstraints(max_length=MAX_TEMPLATE_CHARS, pattern=r"^[^{}]*\{\}[^{}]*$")]


def fill_template(template: str, classname: str) -> str:
    """A validated template with its one `{}` replaced: no format-string syntax is ever interpreted."""
    return template.replace("{}", classname, 1)


def check_export_dtype(name: str) -> None:
    if name not in EXPORT_DTYPE_NAMES:
        raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPE_NAMES)}, got {name!r}")


@dataclass
class PromptConfig:
    """A learned context spliced into "<ctx> {class}." (the fields every context method shares)."""

    n_ctx: int = field(default=4, metadata={"help": "number of learned context tokens"})
    ctx_init: str | None = field(
        default="a photo of a", metadata={"help": "text whose token embeddings start the context; '' = N(0, init_std)"}
    )
    class_token_position: ClassTokenPosition = field(
        default="end", metadata={"help": "where the class name goes", "choices": CLASS_TOKEN_POSITIONS}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the random init when ctx_init is None"})

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be ≥ 1, got {self.n_ctx}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}, got {self.class_token_position!r}"
            )


@dataclass
class QuantizerConfig:
    bits: int = field(default=1, metadata={"help": "bits per prompt value, 1..8 (2^bits centroids)"})
    min_steps: int = field(default=10, metadata={"help": "t: fewest steps between two clusterings"})
    kl_threshold: float = field(
        default=0.001, metadata={"help": "T_KL per degree of freedom: re-cluster when KL > kl_threshold·(2^b − 1)"}
    )
    kmeans_iters: int = field(default=25, metadata={"help": "Lloyd iterations per clustering"})

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, got {self.bits}")
        if self.min_steps < 0 or self.kl_threshold < 0:
            raise ValueError("min_steps and kl_threshold must be ≥ 0")

    @property
    def effective_kl_threshold(self) -> float:
        """T_KL at this bit width: the per-degree-of-freedom threshold times 2^b − 1 (see trainer.methods.quantizer)."""
        return self.kl_threshold * (2**self.bits - 1)


class NoOptions(BaseModel):
    """Options that are informational only (any bounded JSON object): the trainer's config, parameter counts."""

    model_config = ConfigDict(strict=True, extra="allow")
