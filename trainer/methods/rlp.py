"""RLP (arXiv 2312.10813): a frozen hand-written prompt plus a trainable low-rank update.

context = P₀ + dropout(A·B), with P₀ the token embeddings of `ctx_init` (frozen), A [n_ctx, r] zero-initialized
and B [r, d] random, drawn from `init_seed` (the CLI passes the run's `--seed`), so step 0 is exactly the
hand-written prompt (zero-shot CLIP) and runs repeat exactly. Rank 1 over 4×512 trains 4 + 512 = 516 values.
The default export is the factorized form: A and B in float16 plus the init phrase (1,032 payload bytes at
4×512); the service rebuilds P₀ from its own backbone. `export_format="merged"` writes one plain ctx instead
(LoRA's merge pattern), which serves at exactly CoOp's cost either way: the service caches text features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.core.backbone import Backbone
from service.methods.rlp import RLPConfig
from trainer.methods.base import EXPORT_DTYPES, PromptLearner

FACTOR_DTYPE = torch.float16


class LowRankDelta(nn.Module):
    """The trainable branch: dropout(A·B) with A [n_ctx, r] = 0 and B [r, d] ~ N(0, std) drawn from `seed`."""

    def __init__(self, n_ctx: int, width: int, rank: int, dropout: float, std: float | None, seed: int = 1):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.zeros(n_ctx, rank))
        self.b = nn.Parameter(torch.randn(rank, width, generator=generator) * (std if std is not None else width**-0.5))
        self.dropout = nn.Dropout(dropout)

    def get_delta(self) -> torch.Tensor:
        """A·B without dropout (what merging folds in)."""
        return self.a @ self.b

    def forward(self) -> torch.Tensor:
        return self.dropout(self.get_delta())


class RLP(PromptLearner):
    method = "rlp"
    config: RLPConfig
    base: torch.Tensor  # a registered buffer, declared so it types as a tensor, not as `Tensor | Module`

    def __init__(self, config: RLPConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        assert config.ctx_init, "RLPConfig refuses an empty ctx_init"
        # the service rebuilds P₀ with this same function from its backbone (factorized form: service.methods.rlp)
        self.register_buffer("base", backbone.text.phrase_embeddings(config.ctx_init, config.n_ctx))
        self.delta = LowRankDelta(config.n_ctx, backbone.text.width, config.rank, config.dropout, config.factor_std,
                                  config.init_seed)
        self.merged: torch.Tensor | None = None

    def context(self) -> torch.Tensor:
        if self.merged is not None:
            return self.merged
        return self.base + self.delta()

    def merge(self, safe_merge: bool = True) -> None:
        """Fold A·B into one plain prompt; with `safe_merge`, refuse a non-finite result."""
        merged = self.merged_context().clone()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("RLP merge produced NaN/inf values; the low-rank factors diverged")
        self.merged = merged

    def unmerge(self) -> None:
        self.merged = None

    def merged_context(self) -> torch.Tensor:
        return (self.base + self.delta.get_delta()).detach()

    def exported_factors(self) -> dict[str, torch.Tensor]:
        """A and B as stored in the factorized bundle (float16)."""
        return {"a": self.delta.a.detach().to(FACTOR_DTYPE).cpu(), "b": self.delta.b.detach().to(FACTOR_DTYPE).cpu()}

    def export_tensors(self) -> dict[str, torch.Tensor]:
        if self.config.export_format == "factorized":
            return self.exported_factors()
        return {"ctx": self.merged_context().to(EXPORT_DTYPES[self.config.export_dtype]).cpu()}

    def export_options(self) -> dict[str, Any]:
        form = {"format": self.config.export_format, "rank": self.config.rank, "ctx_init": self.config.ctx_init}
        return super().export_options() | form
