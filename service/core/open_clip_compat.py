"""Every open_clip internal the project touches, in one module, gated on the version.

The prompt-aware text encoder splices learned rows into the text tower and reuses a shared prefix's keys
and values block by block; vision-side prompts (MaPLe) and image-conditioned prompts (TGP-T) need the image
tower in pieces (embedded tokens, blocks one by one, pooling). open_clip exposes those only as private
methods and sub-layers (`_embeds`, `_pool`, `ln_1`/`attn`/`ls_1`/`mlp`, the packed attention projection),
so they are reached here and nowhere else. The module refuses an open_clip major version it was not written
for, and `prefix_reuse_blocker` names why the text fast path cannot run instead of silently going slow.
"""

from __future__ import annotations

from typing import TypeAlias

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

SUPPORTED_MAJOR = 3

# open_clip ships no type information, so mypy sees its classes as Any: the annotations below name what each
# function takes, and the open_clip attributes it reaches (`transformer`, `attn_mask`, ...) go unchecked.
ClipModel: TypeAlias = CLIP | CustomTextCLIP
TextTower: TypeAlias = CLIP | TextTransformer  # a CLIP is its own text tower; a CustomTextCLIP keeps it in `.text`


def open_clip_major(version: str = open_clip.__version__) -> int:
    return int(version.split(".")[0])


def check_open_clip_version(version: str = open_clip.__version__) -> None:
    if open_clip_major(version) != SUPPORTED_MAJOR:
        raise RuntimeError(
            f"open_clip {version} is installed; promptserve's image-tower access is written for "
            f"{SUPPORTED_MAJOR}.x: install open_clip_torch>={SUPPORTED_MAJOR},<{SUPPORTED_MAJOR + 1}"
        )


def prompt_capable_vit(visual: nn.Module) -> VisionTransformer:
    """The tower itself, if prompts can be put into it token-wise; a ValueError naming why not otherwise."""
    check_open_clip_version()
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"this method needs an open_clip VisionTransformer image tower, not {type(visual).__name__}")
    if visual.attn_pool is not None:
        raise ValueError("this method does not support image towers with attentional pooling (attn_pool)")
    if not visual.transformer.batch_first:
        raise ValueError("this method needs a batch-first image transformer (open_clip's default)")
    return visual


def vit_embed(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """[B, T, width] tokens entering the first block: patches + class token + positions, after `ln_pre`."""
    return visual._embeds(pixels)


def vit_blocks(visual: VisionTransformer) -> nn.ModuleList:
    return visual.transformer.resblocks


def vit_pool(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The projected image feature from the last block's tokens [B, T, width]; equals `visual(pixels)`."""
    pooled, _ = visual._pool(tokens)
    return pooled @ visual.proj if visual.proj is not None else pooled


def vit_project_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Every token of the last block projected to the joint space, before `ln_post` (TGP-T's image tokens)."""
    return tokens @ visual.proj if visual.proj is not None else tokens


def vit_pooled_and_tokens(visual: VisionTransformer, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image forward, two outputs: the pooled feature (equal to `visual(pixels)`) and every last-block
    token projected before `ln_post` ([B, T, embed_dim], TGP-T's image tokens)."""
    x = visual.transformer(vit_embed(visual, pixels))
    return vit_pool(visual, x), vit_project_tokens(visual, x)


# --- the text tower -----------------------------------------------------------------------------------


def prompt_capable_text_tower(model: ClipModel) -> TextTower:
    """The causal, end-of-text-pooled text tower of a CLIP (CustomTextCLIP keeps it under `.text`)."""
    check_open_clip_version()
    tower = getattr(model, "text", model)
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    if pool_type != "argmax" or getattr(tower, "attn_mask", None) is None or getattr(tower, "cls_emb", None):
        raise ValueError("prompt-aware encoding needs a causal text tower pooled at the end-of-text token "
                         f"(text_pool_type 'argmax'); this model uses {pool_type!r}")
    if not tower.transformer.batch_first:
        raise ValueError("prompt-aware encoding needs a batch-first text transformer (open_clip's default)")
    return tower


def text_blocks(tower: TextTower) -> nn.ModuleList:
    return tower.transformer.resblocks


def text_cast_dtype(tower: TextTower) -> torch.dtype:
    return tower.transformer.get_cast_dtype()


def causal_mask(tower: TextTower, length: int) -> torch.Tensor:
    return tower.attn_mask[:length, :length]


def text_projection(tower: TextTower, pooled: torch.Tensor) -> torch.Tensor:
    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


def prefix_reuse_blocker(tower: TextTower) -> str | None:
    """Why a shared prefix's keys and values cannot be reused block by block on this tower; None if they can.

    The fast path calls each block's sub-layers and its attention's packed in-projection itself, so it needs
    open_clip's default block: pre-norm `ln_1`/`attn`/`ls_1`, `ln_2`/`mlp`/`ls_2`, a packed
    `nn.MultiheadAttention` and no separate key/value norm."""
    for i, block in enumerate(text_blocks(tower)):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return f"text block {i} has no packed nn.MultiheadAttention ({type(attn).__name__})"
        if hasattr(block, "ln_1_kv"):
            return f"text block {i} normalizes keys and values separately (ln_1_kv)"
        missing = [name for name in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2") if not hasattr(block, name)]
        if missing:
            return f"text block {i} lacks {missing}"
    return None


def block_suffix_after_prefix(block: ResidualAttentionBlock, shared: torch.Tensor, suffix: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """One residual block over the suffix rows [B, S, d], attending to the shared prefix rows [1, P, d] (whose
    keys and values are the same for every sequence under the causal mask) and to their own; `mask` [S, P+S]."""
    prefix_keys, prefix_values = _project(block.attn, block.ln_1(shared))[1:]
    queries, keys, values = _project(block.attn, block.ln_1(suffix))
    batch = suffix.shape[0]
    keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), keys], dim=2)
    values = torch.cat([prefix_values.expand(batch, -1, -1, -1), values], dim=2)
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask.to(queries.dtype))
    suffix = suffix + block.ls_1(block.attn.out_proj(attended.transpose(1, 2).reshape(suffix.shape)))
    return suffix + block.ls_2(block.mlp(block.ln_2(suffix)))


def _project(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values [B, heads, L, head_dim] with the layer's own packed projection."""
    batch, length, width = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    return tuple(t.view(batch, length, attn.num_heads, width // attn.num_heads).transpose(1, 2)
                 for t in qkv.chunk(3, dim=-1))


def image_tower_width(visual: nn.Module) -> tuple[int | None, str | None]:
    """(width, None) of an image tower prompts can enter token-wise, or (None, why not)."""
    try:
        return prompt_capable_vit(visual).transformer.width, None
    except ValueError as exc:
        return None, str(exc)


def text_embed_dim(tower: TextTower) -> int:
    """The width of the text tower's output: the joint embedding width."""
    projection = tower.text_projection
    if projection is None:
        return int(tower.token_embedding.weight.shape[1])
    return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])


def deep_prompt_depth_limit(model: ClipModel) -> int:
    """How many layers deep (MaPLe) prompts can reach: the shallower of the two towers."""
    return min(len(vit_blocks(model.visual)), len(text_blocks(prompt_capable_text_tower(model))))
