"""RLP (arXiv 2312.10813): a hand-written prompt plus a trained low-rank update, served as one plain prompt.

Two stored forms (options.format): "merged" (a plain ctx, CoOp's tensors; bundles without a format are merged)
and "factorized" (fp16 factors a [n_ctx, r] and b [r, d] plus options.ctx_init; the base prompt is that phrase's
token embeddings, rebuilt from the serving backbone, so ctx = base + a·b).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

from service.core.records import MAX_CLASSNAME_CHARS
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
    ctx_shape,
)

if TYPE_CHECKING:
    from service.core.text_encoder import PromptTextEncoder

RLP_FORMATS = ("merged", "factorized")


class RLPOptions(BaseModel):
    """"merged": a plain ctx. "factorized": fp16 factors a [n_ctx, rank] and b [rank, d] plus `ctx_init`, the
    phrase whose token embeddings are the base prompt."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal["merged", "factorized"] = "merged"
    rank: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, validate_default=True)
    ctx_init: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASSNAME_CHARS)] | None = Field(
        None, validate_default=True)

    @field_validator("rank")
    @classmethod
    def _factorized_needs_a_rank(cls, rank: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("format") == "factorized" and rank is None:
            raise ValueError("the factorized form needs the rank of its factors")
        return rank

    @field_validator("ctx_init")
    @classmethod
    def _factorized_needs_a_phrase(cls, phrase: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("format") == "factorized" and not (phrase or "").strip():
            raise ValueError("the factorized form needs the non-blank phrase its base prompt is made of")
        return phrase

    def factors(self) -> tuple[int, str] | None:
        """(rank, ctx_init) of the factorized form (the validators guarantee both); None for the merged form."""
        if self.format == "merged" or self.rank is None or self.ctx_init is None:
            return None
        return self.rank, self.ctx_init


@dataclass
class RLPConfig(PromptConfig):
    rank: int = field(default=1, metadata={"help": "rank r of the update A·B"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the low-rank branch (training only)"})
    factor_std: float | None = field(default=None, metadata={"help": "std of B's init (A is 0); None = 1/sqrt(d)"})
    init_seed: int = field(default=1, metadata={"help": "seed of B's random init", "cli": False})  # from --seed
    export_format: str = field(default="factorized", metadata={"help": "'factorized' (A, B fp16) or 'merged' ctx",
                                                               "choices": RLP_FORMATS})
    export_dtype: str = field(default="float32", metadata={"help": "dtype of the merged ctx",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init:
            raise ValueError("RLP starts from a hand-written prompt: set ctx_init (e.g. 'a photo of a')")
        if not 1 <= self.rank <= self.n_ctx:
            raise ValueError(f"rank must be from 1 to n_ctx={self.n_ctx}, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.export_format not in RLP_FORMATS:
            raise ValueError(f"export_format must be one of {list(RLP_FORMATS)}, got {self.export_format!r}")
        check_export_dtype(self.export_dtype)


class RLPSpec(MethodSpec[RLPOptions]):
    name = "rlp"
    kind = Kind.TEXT
    options_model = RLPOptions
    uses_context = True
    config = RLPConfig
    learner = "trainer.methods.rlp:RLP"
    # No public code: CoOp's recipe at lr 0.2, chosen on the procedural world's validation split (0.002 and 0.02
    # leave A·B, which starts at A = 0, where it started; docs/base_to_novel.md has the sweep).
    train_defaults = {"lr": 0.2}

    def check(self, b: Described[RLPOptions]) -> None:
        super().check(b)
        if b.options.format == "factorized" and b.prompt.class_specific:
            raise BundleError("prompt.class_specific", "the factorized RLP form has one context shared by all classes")

    def tensor_rules(self, b: Described[RLPOptions]) -> dict[str, TensorRule]:
        factors = b.options.factors()
        if factors is None:
            return {"ctx": TensorRule(ctx_shape(b), FLOAT_DTYPES)}
        rank, p = factors[0], b.prompt
        return {"a": TensorRule((p.n_ctx, rank), HALF_OR_FULL), "b": TensorRule((rank, p.ctx_dim), HALF_OR_FULL)}

    def class_prompt(self, b: Decoded[RLPOptions], text: PromptTextEncoder | None = None) -> ClassPrompt:
        """Merged: the stored ctx. Factorized: base (the init phrase's embeddings) + a·b, in float32."""
        t, factors = b.tensors, b.options.factors()
        if factors is None:
            return ClassPrompt(t["ctx"].float())
        if text is None:
            raise ValueError("a factorized RLP prompt is rebuilt from the backbone's token embeddings: pass its text "
                             "encoder")
        try:
            base = text.phrase_embeddings(factors[1], b.prompt.n_ctx)
        except ValueError as exc:
            raise BundleError("options.ctx_init", str(exc)) from exc
        return ClassPrompt(base + t["a"].float() @ t["b"].float())


SPEC = RLPSpec()
