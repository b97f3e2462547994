"""Serving image-conditioned prompts (TGP-T): one image forward for tokens + pooled features, two text calls per
micro-batch whatever the task count, the bundle's checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.bundle.codec import Bundle, decode_bundle, encode_bundle
from service.bundle.compat import check_compatible
from service.core.bonder import group_logits
from service.core.open_clip_compat import prompt_capable_vit, vit_pooled_and_tokens
from service.methods import BundleError
from tests.helpers import count_calls, tgpt_bundle


@pytest.fixture(scope="module")
def images(tiny_backbone):
    pixels = torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return pixels, tiny_backbone.encode_image_tokens(pixels)


def test_one_image_forward_gives_the_plain_features_and_the_projected_tokens(tiny_backbone, images) -> None:
    pixels, out = images
    visual = prompt_capable_vit(tiny_backbone.model.visual)
    with torch.no_grad():
        assert torch.equal(out.pooled, visual(pixels))
        x = visual.transformer(visual._embeds(pixels))
    torch.testing.assert_close(out.features, tiny_backbone.encode_images(pixels))
    assert out.tokens.shape == (5, 1 + (48 // 12) ** 2, 128)
    torch.testing.assert_close(out.tokens, x @ visual.proj)  # before ln_post, after proj, CLS included
    assert torch.equal(vit_pooled_and_tokens(visual, pixels)[1], out.tokens)


@pytest.mark.parametrize("class_counts", [(3, 40)])
def test_a_micro_batch_of_two_tasks_costs_exactly_two_text_calls_and_activation_none(
        tiny_backbone, images, monkeypatch, class_counts) -> None:
    calls = count_calls(monkeypatch, tiny_backbone.text)
    small, large = (decode_bundle(tgpt_bundle(tiny_backbone, c, seed=c, content=20 + c % 7)) for c in class_counts)
    for bundle in (small, large):
        check_compatible(bundle, tiny_backbone)
    models = [small.image_model(), large.image_model()]
    assert calls == []  # activation encodes no class text
    _, out = images
    blocks = ([0, 2, 4], [1, 3])  # the rows of each task, interleaved in the micro-batch
    with torch.inference_mode():
        logits = group_logits(tiny_backbone.text, models, [out.tokens[b] for b in blocks],
                              [out.pooled[b] for b in blocks])
    assert calls == [5, 5]  # category prompts of all rows, then content prompts of all rows
    assert [block.shape for block in logits] == [(3, 3), (2, 40)]


def test_batched_logits_equal_one_image_at_a_time(tiny_backbone, images) -> None:
    _, out = images
    models = [decode_bundle(tgpt_bundle(tiny_backbone, n, seed=n, category=4 + n)).image_model() for n in (3, 7)]
    blocks = ([0, 2, 4], [1, 3])
    with torch.inference_mode():
        together = group_logits(tiny_backbone.text, models, [out.tokens[b] for b in blocks],
                                [out.pooled[b] for b in blocks])
        for model, rows, batched in zip(models, blocks, together, strict=True):
            for i, row_logits in zip(rows, batched, strict=True):
                (alone,) = group_logits(tiny_backbone.text, [model], [out.tokens[[i]]], [out.pooled[[i]]])
                torch.testing.assert_close(row_logits, alone[0], atol=1e-5, rtol=1e-5)


def test_fp16_bundle_serves_in_float32_close_to_its_fp32_twin(tiny_backbone, images) -> None:
    _, out = images
    full, half = (decode_bundle(tgpt_bundle(tiny_backbone, 3, dtype=dt)).image_model()
                  for dt in (torch.float32, torch.float16))
    assert half.head.weight.dtype == torch.float32
    with torch.inference_mode():
        logits = [group_logits(tiny_backbone.text, [m], [out.tokens[:1]], [out.pooled[:1]])[0] for m in (half, full)]
    torch.testing.assert_close(logits[0], logits[1], atol=0.05, rtol=0.01)


def test_bundle_without_an_image_fingerprint_is_refused_by_name(tiny_backbone) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    manifest = dataclasses.replace(bundle.manifest, backbone=tiny_backbone.ref())
    with pytest.raises(BundleError, match="backbone.image_fingerprint.*required"):
        encode_bundle(manifest, bundle.tensors)


def test_bundle_trained_on_another_image_tower_is_refused(tiny_backbone) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    other = dataclasses.replace(bundle.manifest.backbone, image_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(BundleError, match="another image tower"):
        check_compatible(Bundle(dataclasses.replace(bundle.manifest, backbone=other), {}), tiny_backbone)


@pytest.mark.parametrize(("options", "field"), [
    ({"heads": 7}, "options.heads"),
    ({"category_queries": 0}, "options.category_queries"),
    ({"width": True}, "options.width"),
    ({"content_queries": 5000}, "options.content_queries"),
])
def test_bad_sizes_are_refused_by_field(tiny_backbone, options, field) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    manifest = dataclasses.replace(bundle.manifest, options={**bundle.manifest.options, **options})
    with pytest.raises(BundleError) as err:
        encode_bundle(manifest, bundle.tensors)
    assert err.value.field == field


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(tiny_backbone) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    tensors = {**bundle.tensors, "head.weight": torch.zeros(4, 256)}
    with pytest.raises(BundleError, match="head.weight.*shape"):
        encode_bundle(bundle.manifest, tensors)


def test_sizes_that_do_not_fit_the_backbone_are_refused_at_activation(tiny_backbone, backbone) -> None:
    too_long = decode_bundle(tgpt_bundle(tiny_backbone, 3, content=30))  # 30 + 3 > 32
    with pytest.raises(BundleError, match="exceed the text context length 32"):
        check_compatible(too_long, tiny_backbone)
    manifest = decode_bundle(tgpt_bundle(tiny_backbone, 3)).manifest
    micro = dataclasses.replace(manifest, backbone=backbone.ref(with_image=True))
    with pytest.raises(BundleError, match="options.width"):  # the micro CLIP's text is 64 wide, not 128
        check_compatible(Bundle(micro, {}), backbone)
