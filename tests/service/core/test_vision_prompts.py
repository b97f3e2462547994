"""The prompted image forward: identities that hold on a class-token tower and an average-pooled one."""

from __future__ import annotations

import pytest
import torch

from service.core.open_clip_compat import vit_blocks, vit_embed, vit_pool
from service.core.vision_prompts import prompted_image_features

TOWERS = ["deep_backbone", "tiny_backbone"]  # pool_type 'tok' and 'avg'


def _pixels(visual, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *visual.image_size, generator=torch.Generator().manual_seed(seed))


def _prompts(visual, batch: int, depth: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    width = visual.transformer.width
    return torch.randn(batch, depth, n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=TOWERS)
def visual(request):
    return request.getfixturevalue(request.param).model.visual


@torch.no_grad()
def test_no_prompts_is_exactly_the_plain_image_forward(visual):
    pixels = _pixels(visual, 3)
    assert torch.equal(prompted_image_features(visual, pixels, None), visual(pixels))


@torch.no_grad()
def test_prompts_hidden_from_the_image_tokens_leave_the_plain_output(visual):
    """With the n prompt columns masked out of the T image rows' attention, the output is visual(px)."""
    pixels, depth = _pixels(visual, 2), len(vit_blocks(visual))
    prompts = _prompts(visual, 2, depth) * 5
    x = vit_embed(visual, pixels)
    tokens, n = x.shape[1], prompts.shape[2]
    mask = torch.zeros(tokens + n, tokens + n)
    mask[:tokens, tokens:] = float("-inf")
    x = torch.cat([x, visual.ln_pre(prompts[:, 0])], dim=1)
    for i, block in enumerate(vit_blocks(visual)):
        if i:
            x = torch.cat([x[:, :tokens], prompts[:, i]], dim=1)
        x = block(x, attn_mask=mask)
    torch.testing.assert_close(vit_pool(visual, x[:, :tokens]), visual(pixels), rtol=0, atol=1e-6)
    # Unmasked, the same prompts do move the features: the forward really uses them.
    assert (prompted_image_features(visual, pixels, prompts) - visual(pixels)).abs().max() > 1e-3


@torch.no_grad()
def test_rows_with_different_prompts_in_one_batch_equal_one_forward_per_row(visual):
    depth = len(vit_blocks(visual))
    pixels, prompts = _pixels(visual, 4), _prompts(visual, 4, depth)
    batched = prompted_image_features(visual, pixels, prompts)
    for row in range(4):
        alone = prompted_image_features(visual, pixels[row : row + 1], prompts[row : row + 1])
        torch.testing.assert_close(batched[row : row + 1], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_shallower_prompts_only_replace_the_first_blocks(deep_backbone):
    """Depth 1 (prompts appended once, carried through every block) differs from depth 3."""
    visual = deep_backbone.model.visual
    pixels, prompts = _pixels(visual, 2), _prompts(visual, 2, 3)
    shallow = prompted_image_features(visual, pixels, prompts[:, :1])
    assert not torch.allclose(shallow, prompted_image_features(visual, pixels, prompts), atol=1e-4)


def test_prompts_of_the_wrong_shape_are_refused_naming_the_shape(deep_backbone):
    visual = deep_backbone.model.visual
    pixels = _pixels(visual, 2)
    with pytest.raises(ValueError, match="vision prompts must be"):
        prompted_image_features(visual, pixels, torch.zeros(2, 1, 2, 7))
    with pytest.raises(ValueError, match="depth must be 1..3"):
        prompted_image_features(visual, pixels, torch.zeros(2, 4, 2, 64))


def test_prompts_receive_gradients_through_the_frozen_tower(deep_backbone):
    visual = deep_backbone.model.visual
    prompts = _prompts(visual, 2, 3).requires_grad_(True)
    prompted_image_features(visual, _pixels(visual, 2), prompts).sum().backward()
    assert all(prompts.grad[:, i].abs().sum() > 0 for i in range(3))
