import pytest
import torch

from service.core.records import PromptLayout

CLASSES = ["cat", "golden retriever", "space shuttle", "a"]


def context_of(backbone, text: str) -> torch.Tensor:
    ids = torch.tensor(backbone.tokenizer.encode(text))
    return backbone.text.tower.token_embedding(ids).detach()


def open_clip_features(backbone, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.model.encode_text(backbone.tokenizer(texts))


@pytest.mark.parametrize(
    ("position", "template"),
    [("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a.")],
)
def test_spliced_context_equals_open_clip_encode_text(backbone, position, template):
    layout = PromptLayout(n_ctx=4, ctx_dim=backbone.text.width, class_token_position=position)
    with torch.no_grad():
        ours = backbone.text.encode_classes(CLASSES, context_of(backbone, "a photo of a"), layout)
    reference = open_clip_features(backbone, [template.format(c) for c in CLASSES])
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_class_specific_context_goes_to_its_own_class(backbone):
    layout = PromptLayout(n_ctx=2, ctx_dim=backbone.text.width, class_specific=True)
    prefixes = ["a photo", "a drawing"]
    ctx = torch.stack([context_of(backbone, p) for p in prefixes])
    with torch.no_grad():
        ours = backbone.text.encode_classes(["cat", "dog"], ctx, layout)
    reference = open_clip_features(backbone, ["a photo cat.", "a drawing dog."])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_plain_texts_equal_open_clip_encode_text(backbone):
    texts = ["a photo of a cat.", "an extremely long description of a very particular kind of space shuttle."]
    with torch.no_grad():
        assert torch.allclose(backbone.text.encode_texts(texts), open_clip_features(backbone, texts), atol=1e-5)


def test_gradients_reach_the_context(backbone):
    layout = PromptLayout(n_ctx=4, ctx_dim=backbone.text.width)
    ctx = torch.zeros(4, backbone.text.width, requires_grad=True)
    backbone.text.encode_classes(CLASSES, ctx, layout).square().sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_prompt_longer_than_context_names_the_class(backbone):
    layout = PromptLayout(n_ctx=74, ctx_dim=backbone.text.width)
    with pytest.raises(ValueError, match="space shuttle"):
        backbone.text.class_prompt_tokens(["space shuttle"], layout)


def test_shared_prefix_reuse_matches_the_plain_path(backbone):
    many = [f"class number {i}" for i in range(40)] + CLASSES
    layout = PromptLayout(n_ctx=4, ctx_dim=backbone.text.width)
    ctx = torch.randn(4, backbone.text.width) * 0.05
    tokens = backbone.text.class_prompt_tokens(many, layout)
    with torch.no_grad():
        fast = backbone.text.encode_tokens(tokens, ctx)
        plain = backbone.text.encode_tokens(tokens, ctx, reuse_prefix=False)
        full_77 = open_clip_features(backbone, [f"a photo of a {c}." for c in many])
        templates = backbone.text.encode_texts([f"a photo of a {c}." for c in many])
    assert torch.allclose(fast, plain, atol=1e-5)
    assert torch.allclose(templates, full_77, atol=1e-5)


def test_shared_prefix_length_stops_at_the_first_difference():
    from service.core.text_encoder import shared_prefix_length

    x = torch.zeros(3, 6, 2)
    x[1, 4] = 1.0
    assert shared_prefix_length(x, limit=6) == 4
    assert shared_prefix_length(x, limit=3) == 3


# --- deep prompts (MaPLe) -----------------------------------------------------------------------------


def hidden_states_at(backbone, text: str, rows: slice) -> torch.Tensor:
    """The plain model's inputs to blocks 1..L-1 at `rows` of `text` ([L-1, len(rows), d])."""
    tower = backbone.text.tower
    ids = backbone.tokenizer([text])[:, :32]
    x = tower.token_embedding(ids) + tower.positional_embedding[: ids.shape[1]]
    states = []
    for i, block in enumerate(tower.transformer.resblocks):
        if i:
            states.append(x[0, rows])
        x = block(x, attn_mask=tower.attn_mask[: ids.shape[1], : ids.shape[1]])
    return torch.stack(states).detach()


@pytest.mark.parametrize("tower", ["deep_backbone", "tiny_backbone"])
@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_deep_prompts_set_to_the_plain_hidden_states_equal_encode_text(request, tower, reuse_prefix):
    """ctx = embeddings of "a photo", deep prompts = the plain model's hidden states at those rows:
    the prompt [SOT, ctx, of, a, {class}, ., EOT] then encodes exactly "a photo of a {class}."."""
    backbone = request.getfixturevalue(tower)
    layout = PromptLayout(n_ctx=2, ctx_dim=backbone.text.width)
    classes = ["cat", "golden retriever", "space shuttle"]
    deep = hidden_states_at(backbone, "a photo of a cat.", slice(1, 3))  # the prefix rows are class-independent
    tokens = backbone.text.class_prompt_tokens(classes, layout, fixed_text="of a")
    with torch.no_grad():
        ours = backbone.text.encode_tokens(tokens, context_of(backbone, "a photo"), reuse_prefix, deep=deep)
    reference = open_clip_features(backbone, [f"a photo of a {c}." for c in classes])
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_deep_prompts_change_the_features_and_get_gradients(deep_backbone):
    layout = PromptLayout(n_ctx=2, ctx_dim=deep_backbone.text.width)
    ctx = context_of(deep_backbone, "a photo")
    deep = (torch.randn(2, 2, deep_backbone.text.width) * 0.5).requires_grad_(True)
    with_deep = deep_backbone.text.encode_classes(CLASSES[:3], ctx, layout, deep=deep, fixed_text="of a")
    with torch.no_grad():
        without = deep_backbone.text.encode_classes(CLASSES[:3], ctx, layout, fixed_text="of a")
    assert (with_deep - without).abs().max() > 1e-3
    with_deep.sum().backward()
    assert deep.grad[0].abs().sum() > 0 and deep.grad[1].abs().sum() > 0


def test_deep_prompts_with_shared_prefix_match_the_full_forward(deep_backbone):
    layout = PromptLayout(n_ctx=2, ctx_dim=deep_backbone.text.width)
    ctx, deep = context_of(deep_backbone, "a photo"), torch.randn(2, 2, deep_backbone.text.width)
    tokens = deep_backbone.text.class_prompt_tokens(CLASSES, layout, fixed_text="of a")
    with torch.no_grad():
        reused = deep_backbone.text.encode_tokens(tokens, ctx, True, deep=deep)
        full = deep_backbone.text.encode_tokens(tokens, ctx, False, deep=deep)
    torch.testing.assert_close(reused, full, rtol=0, atol=1e-5)


def test_deep_prompts_need_the_context_at_the_same_place_in_every_prompt(deep_backbone):
    layout = PromptLayout(n_ctx=2, ctx_dim=deep_backbone.text.width, class_token_position="front")
    with pytest.raises(ValueError, match="same positions"):
        deep_backbone.text.encode_classes(CLASSES, torch.zeros(2, 64), layout, deep=torch.zeros(2, 2, 64))
