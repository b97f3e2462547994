"""The image-tower pieces reached through open_clip's internals recompose the plain forward exactly."""

import pytest
import torch

from service.open_clip_compat import (
    check_open_clip_version,
    prompt_capable_vit,
    vit_blocks,
    vit_embed,
    vit_pool,
)


def test_embed_blocks_pool_equal_the_plain_image_forward(backbone):
    visual = prompt_capable_vit(backbone.model.visual)
    pixels = torch.randn(3, 3, *visual.image_size, generator=torch.Generator().manual_seed(0))
    x = vit_embed(visual, pixels)
    for block in vit_blocks(visual):
        x = block(x)
    with torch.no_grad():
        assert torch.equal(vit_pool(visual, x), visual(pixels))


def test_another_open_clip_major_version_is_refused_with_the_fix():
    check_open_clip_version("3.3.0")
    with pytest.raises(RuntimeError, match="open_clip_torch>=3,<4"):
        check_open_clip_version("4.0.0")


def test_a_tower_that_is_not_a_vit_is_refused():
    with pytest.raises(ValueError, match="VisionTransformer"):
        prompt_capable_vit(torch.nn.Linear(2, 2))
