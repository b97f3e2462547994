"""Every open_clip internal the project touches on the image side, in one module, gated on the version.

Vision-side prompts (MaPLe) and image-conditioned prompts (TGP-T) need the image tower in pieces: the
embedded tokens before the first block, the blocks one by one, and the pooling. open_clip exposes those
only as private methods (`_embeds`, `_pool`), so they are reached here and nowhere else, and the module
refuses an open_clip major version it was not written for instead of computing something else silently.
"""

from __future__ import annotations

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

SUPPORTED_MAJOR = 3


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
