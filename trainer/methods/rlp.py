"""RLP (arXiv 2312.10813): a frozen hand-written prompt plus a trainable low-rank update, merged at export.

context = P₀ + dropout(A·B), with P₀ the token embeddings of `ctx_init` (frozen), A [n_ctx, r] zero-initialized
and B [r, d] small random, so step 0 is exactly the hand-written prompt (zero-shot CLIP). Rank 1 over
4×512 trains 4 + 512 = 516 values. `merge()` folds A·B into one plain prompt (LoRA's pattern), so the
service runs it at exactly CoOp's cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from service.backbone import Backbone
from trainer.methods.base import EXPORT_DTYPES, PromptConfig, PromptLearner, text_init_context


@dataclass
class RLPConfig(PromptConfig):
    rank: int = field(default=1, metadata={"help": "rank r of the update A·B"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the low-rank branch (training only)"})
    factor_std: float | None = field(default=None, metadata={"help": "std of B's init (A is 0); None = 1/sqrt(d)"})
    export_dtype: str = field(default="float32", metadata={"help": "dtype of the merged ctx: float16 or float32"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ctx_init:
            raise ValueError("RLP starts from a hand-written prompt: set ctx_init (e.g. 'a photo of a')")
        if not 1 <= self.rank <= self.n_ctx:
            raise ValueError(f"rank must be from 1 to n_ctx={self.n_ctx}, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype must be one of {list(EXPORT_DTYPES)}, got {self.export_dtype!r}")


class LowRankDelta(nn.Module):
    """The trainable branch: dropout(A·B) with A [n_ctx, r] = 0 and B [r, d] ~ N(0, std)."""

    def __init__(self, n_ctx: int, width: int, rank: int, dropout: float, std: float | None):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(n_ctx, rank))
        self.b = nn.Parameter(torch.randn(rank, width) * (std if std is not None else width**-0.5))
        self.dropout = nn.Dropout(dropout)

    def get_delta(self) -> torch.Tensor:
        """A·B without dropout (what merging folds in)."""
        return self.a @ self.b

    def forward(self) -> torch.Tensor:
        return self.dropout(self.get_delta())


class RLP(PromptLearner):
    method = "rlp"

    def __init__(self, config: RLPConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        self.register_buffer("base", text_init_context(backbone, config.ctx_init, config.n_ctx))
        self.delta = LowRankDelta(config.n_ctx, backbone.text.width, config.rank, config.dropout, config.factor_std)
        self.merged: torch.Tensor | None = None

    def context(self) -> torch.Tensor:
        if self.merged is not None:
            return self.merged
        return self.base + self.delta()

    def merge(self, safe_merge: bool = True) -> None:
        """Fold A·B into one plain prompt; with `safe_merge`, refuse a non-finite result."""
        merged = (self.base + self.delta.get_delta()).detach().clone()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("RLP merge produced NaN/inf values; the low-rank factors diverged")
        self.merged = merged

    def unmerge(self) -> None:
        self.merged = None

    def merged_context(self) -> torch.Tensor:
        return (self.base + self.delta.get_delta()).detach()

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.merged_context().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()}
