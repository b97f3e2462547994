"""The image-tower pieces reached through open_clip's internals recompose the plain forward exactly."""

import pytest
import torch

from service.core.open_clip_compat import check_open_clip_version, prompt_capable_vit, vit_blocks, vit_embed, vit_pool


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


@pytest.mark.parametrize("model", ["test-micro", "promptserve-tiny", "ViT-B-16"])
def test_the_shared_prefix_fast_path_runs_on_the_models_we_serve(model):
    """Fails loudly, naming the cause, if an open_clip release changes the text blocks the fast path reaches
    into (instead of activation silently getting slower)."""
    import open_clip

    from service.core.text_encoder import PromptTextEncoder

    clip = open_clip.create_model(model, pretrained=None)
    encoder = PromptTextEncoder(clip, open_clip.get_tokenizer(model))
    assert encoder.prefix_reuse_blocker is None
    assert encoder.can_reuse_prefix


def test_a_text_block_the_fast_path_cannot_reach_into_is_named(backbone):
    import copy

    from service.core.open_clip_compat import prefix_reuse_blocker, text_blocks

    tower = copy.deepcopy(backbone.model)
    text_blocks(tower)[1].attn = torch.nn.Identity()
    assert prefix_reuse_blocker(tower) == "text block 1 has no packed nn.MultiheadAttention (Identity)"
