"""Image-conditioned prompts (TGP-T): the Bonder (EricTan7/TGP-T `models/bonder/attn.py`), the queries, the linear
head, and how their prompts go through the frozen text tower.

The bundle contract derives a TGP-T bundle's tensor names and shapes from `TGPTModel` itself, and trainer and
service score through the same `group_logits`, so they cannot disagree. Per micro-batch, all image-conditioned
rows of all tasks share the text tower: their category prompts go through it in ONE call and their content
prompts in ONE more, whatever the number of tasks or classes.

The Bonder: learned queries read the image tokens.
One pre-LayerNorm block of three residual steps over the queries [B, nq, d]:
(a) multi-head self-attention (qkv Linear(d, 3d) without bias, output projection with bias);
(b) cross-attention queries → LayerNorm(image tokens): only the query side is projected (Linear(d, d), no
    bias); keys and values ARE the normalized image tokens (no K/V projections), one head, scaled by
    (d / heads)^-½ as the reference does; then an output projection with bias;
(c) an MLP whose hidden width is d (not 4d), GELU.
Parameters: 8d² + 12d (the reference also builds two LayerNorms its forward never uses; they are left out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.core.text_encoder import PromptTextEncoder


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"Bonder width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.scale = (width // heads) ** -0.5
        self.q = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.q(queries), image_tokens, image_tokens, scale=self.scale)
        return self.proj(out)


class Bonder(nn.Module):
    def __init__(self, width: int, heads: int = 8):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.norm2_q = nn.LayerNorm(width)
        self.norm2_kv = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Queries [B or 1, nq, d] and image tokens [B, T, d] → prompt rows [B, nq, d]."""
        queries = queries.expand(image_tokens.shape[0], -1, -1)
        queries = queries + self.self_attn(self.norm1(queries))
        queries = queries + self.cross_attn(self.norm2_q(queries), self.norm2_kv(image_tokens))
        return queries + self.mlp(self.norm_mlp(queries))


HEAD_SCALE = 100.0  # the reference's fixed logit scale exp(4.60517)


@dataclass(frozen=True)
class TGPTDims:
    """The sizes a TGP-T bundle records (manifest options) and its tensors follow."""

    category_queries: int
    content_queries: int
    width: int  # text width = Bonder width = width of the projected image tokens
    embed_dim: int  # joint embedding width (pooled image feature, text feature)
    heads: int = 8


class TGPTModel(nn.Module):
    """Static queries, one Bonder per stream (category, content) and the head Linear(2·embed_dim → C, no bias)."""

    def __init__(self, dims: TGPTDims, n_classes: int):
        super().__init__()
        self.dims = dims
        self.category_queries = nn.Parameter(torch.zeros(dims.category_queries, dims.width))
        self.content_queries = nn.Parameter(torch.zeros(dims.content_queries, dims.width))
        self.bonder_category = Bonder(dims.width, dims.heads)
        self.bonder_content = Bonder(dims.width, dims.heads)
        self.head = nn.Linear(2 * dims.embed_dim, n_classes, bias=False)

    def prompts(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Category and content prompt rows [B, nq, width] for image tokens [B, T, width]."""
        return (self.bonder_category(self.category_queries[None], image_tokens),
                self.bonder_content(self.content_queries[None], image_tokens))

    def classify(self, pooled: torch.Tensor, text_category: torch.Tensor, text_content: torch.Tensor) -> torch.Tensor:
        """100 · head(normalize(cat[image feature, mean of the two text features])) — raw features in, [B, C] out."""
        fused = torch.cat([pooled, (text_category + text_content) / 2], dim=-1)
        return HEAD_SCALE * self.head(F.normalize(fused.float(), dim=-1))


def tgpt_parameter_shapes(dims: TGPTDims, n_classes: int) -> dict[str, tuple[int, ...]]:
    """Name → shape of every TGP-T parameter (built on the meta device: no memory, any size)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in TGPTModel(dims, n_classes).named_parameters()}


def encode_prompt_rows(encoder: PromptTextEncoder, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Text features of `[SOT, rows, ".", EOT]` for every row block [B_i, n_i, width], in ONE text-tower call."""
    x, eot = encoder.sentence_embeddings(list(groups))
    features = encoder.encode_embeddings(x, eot, reuse_prefix=False)  # only SOT is shared: nothing to reuse
    return list(features.float().split([g.shape[0] for g in groups]))


def logits_from_prompts(
    encoder: PromptTextEncoder, models: Sequence[TGPTModel], pooled: Sequence[torch.Tensor],
    prompts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """Per model, logits [B_i, C_i] from its rows' pooled features and Bonder outputs: two text calls in all."""
    category = encode_prompt_rows(encoder, [p[0] for p in prompts])
    content = encode_prompt_rows(encoder, [p[1] for p in prompts])
    return [m.classify(p, c, o) for m, p, c, o in zip(models, pooled, category, content, strict=True)]


def group_logits(
    encoder: PromptTextEncoder, models: Sequence[TGPTModel], tokens: Sequence[torch.Tensor],
    pooled: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Logits of several tasks, each with its own image block (tokens [B_i, T, width], pooled [B_i, D])."""
    prompts = [m.prompts(t) for m, t in zip(models, tokens, strict=True)]
    return logits_from_prompts(encoder, models, pooled, prompts)
