"""The prompted image forward of vision-side methods (MaPLe): per-row deep prompts in one batched forward.

Prompts `prompts` [B, J, n, d_v] are appended after the image tokens: row 0 goes through `ln_pre` (which is
per token, so appending after `_embeds` equals the reference's order), and before blocks 1..J-1 the last
n tokens are replaced by rows 1..J-1 (not through `ln_pre`). Pooling sees only the image tokens
`x[:, :T]`, which matters for average pooling. Each batch row may carry another task's prompts; the blocks
treat rows independently, so one forward equals one forward per row. No hooks: the tower is run block by
block through `service.core.open_clip_compat`, so a concurrent plain forward on the same module is unaffected.

Trainer (MaPLe's learner, with gradients), evaluator and service (`Backbone.encode_prompted_images`) all
run `prompted_features`, so their image features agree by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from service.core.open_clip_compat import prompt_capable_vit, vit_blocks, vit_embed, vit_pool


def prompted_features(visual: nn.Module, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """L2-normalized float32 image features [B, D] (on the tower's device) under vision prompts: [J, n, d_v]
    for every row, or [B, J, n, d_v] per row. Differentiable in `prompts`."""
    if prompts.dim() == 3:
        prompts = prompts.expand(pixels.shape[0], *prompts.shape)
    return F.normalize(prompted_image_features(visual, pixels, prompts).float(), dim=-1)


def prompted_image_features(visual: nn.Module, pixels: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
    """Unnormalized image features [B, D] of pixels [B, 3, H, W] under per-row prompts [B, J, n, d_v].

    `prompts=None` is the plain forward (equal to `visual(pixels)`). Differentiable in `prompts`.
    """
    vit = prompt_capable_vit(visual)
    x = vit_embed(vit, pixels)
    blocks = vit_blocks(vit)
    if prompts is None:
        for block in blocks:
            x = block(x)
        return vit_pool(vit, x)
    check_prompts(prompts, x.shape[0], vit.transformer.width, len(blocks))
    tokens = x.shape[1]
    prompts = prompts.to(x.device, x.dtype)
    x = torch.cat([x, vit.ln_pre(prompts[:, 0])], dim=1)
    for i, block in enumerate(blocks):
        if 0 < i < prompts.shape[1]:
            x = torch.cat([x[:, :tokens], prompts[:, i]], dim=1)
        x = block(x)
    return vit_pool(vit, x[:, :tokens])


def check_prompts(prompts: torch.Tensor, batch: int, width: int, layers: int) -> None:
    if prompts.dim() != 4 or prompts.shape[0] != batch or prompts.shape[3] != width:
        raise ValueError(f"vision prompts must be [{batch}, J, n, {width}], got {list(prompts.shape)}")
    if not 1 <= prompts.shape[1] <= layers or prompts.shape[2] < 1:
        raise ValueError(f"vision prompt depth must be 1..{layers} with n ≥ 1, got {list(prompts.shape)}")
