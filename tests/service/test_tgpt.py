"""Serving TGP-T: one image forward for tokens + pooled features, two text calls per micro-batch, the bundle."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.bonder import TGPTDims, TGPTModel
from service.bundle import BundleError, Manifest, decode_bundle, encode_bundle
from service.config import BundleLimits
from service.open_clip_compat import prompt_capable_vit, vit_pooled_and_tokens
from service.tasks import check_compatible
from service.tgpt import TGPTRow, encode_image_tokens, model_from_bundle, tgpt_logits


def dims_for(backbone, category: int = 8, content: int = 24) -> TGPTDims:
    return TGPTDims(category, content, backbone.text.width, backbone.model.visual.output_dim)


def tgpt_bundle(backbone, n_classes: int, seed: int = 0, dtype: torch.dtype = torch.float32, **dims) -> bytes:
    """A valid TGP-T bundle for `backbone` with random weights (queries at the reference's N(0, 0.02) scale)."""
    torch.manual_seed(seed)
    d = dims_for(backbone, **dims)
    model = TGPTModel(d, n_classes)
    with torch.no_grad():
        model.category_queries.normal_(0, 0.02)
        model.content_queries.normal_(0, 0.02)
        model.head.weight.normal_(0, 0.1)
    manifest = Manifest("tgpt", backbone.ref(with_image=True), tuple(f"class {i}" for i in range(n_classes)),
                        options=dataclasses.asdict(d))
    return encode_bundle(manifest, {k: v.to(dtype) for k, v in model.state_dict().items()})


def count_calls(monkeypatch, encoder) -> list[int]:
    """Wrap the real encoder's one entry into the text tower; each call records its batch size."""
    calls, real = [], encoder.encode_embeddings

    def counted(x, eot, reuse_prefix=True):
        calls.append(x.shape[0])
        return real(x, eot, reuse_prefix)

    monkeypatch.setattr(encoder, "encode_embeddings", counted)
    return calls


@pytest.fixture(scope="module")
def images(tiny_backbone):
    pixels = torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return pixels, encode_image_tokens(tiny_backbone, pixels)


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
        check_compatible(bundle.manifest, tiny_backbone, BundleLimits(max_classes=1000))
    models = [model_from_bundle(small), model_from_bundle(large)]
    assert calls == []  # activation encodes no class text
    _, out = images
    rows = [TGPTRow(models[i % 2], out.tokens[i], out.pooled[i]) for i in range(5)]
    logits = tgpt_logits(tiny_backbone.text, rows)
    assert calls == [5, 5]  # category prompts of all rows, then content prompts of all rows
    assert [row.shape for row in logits] == [(3,), (40,), (3,), (40,), (3,)]


def test_batched_logits_equal_one_image_at_a_time(tiny_backbone, images) -> None:
    _, out = images
    models = [model_from_bundle(decode_bundle(tgpt_bundle(tiny_backbone, n, seed=n, category=4 + n)))
              for n in (3, 7)]
    rows = [TGPTRow(models[i % 2], out.tokens[i], out.pooled[i]) for i in range(5)]
    together = tgpt_logits(tiny_backbone.text, rows)
    for row, batched in zip(rows, together, strict=True):
        (alone,) = tgpt_logits(tiny_backbone.text, [row])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_fp16_bundle_serves_in_float32_close_to_its_fp32_twin(tiny_backbone, images) -> None:
    _, out = images
    full, half = (model_from_bundle(decode_bundle(tgpt_bundle(tiny_backbone, 3, dtype=dt)))
                  for dt in (torch.float32, torch.float16))
    assert half.head.weight.dtype == torch.float32
    rows = lambda m: [TGPTRow(m, out.tokens[0], out.pooled[0])]  # noqa: E731
    torch.testing.assert_close(tgpt_logits(tiny_backbone.text, rows(half))[0],
                               tgpt_logits(tiny_backbone.text, rows(full))[0], atol=0.05, rtol=0.01)


def test_bundle_without_an_image_fingerprint_is_refused_by_name(tiny_backbone) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    manifest = dataclasses.replace(bundle.manifest, backbone=tiny_backbone.ref())
    with pytest.raises(BundleError, match="backbone.image_fingerprint.*required"):
        encode_bundle(manifest, bundle.tensors)


def test_bundle_trained_on_another_image_tower_is_refused(tiny_backbone) -> None:
    bundle = decode_bundle(tgpt_bundle(tiny_backbone, 3))
    other = dataclasses.replace(bundle.manifest.backbone, image_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(BundleError, match="another image tower"):
        check_compatible(dataclasses.replace(bundle.manifest, backbone=other), tiny_backbone, BundleLimits())


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
        check_compatible(too_long.manifest, tiny_backbone, BundleLimits())
    manifest = decode_bundle(tgpt_bundle(tiny_backbone, 3)).manifest
    micro = dataclasses.replace(manifest, backbone=backbone.ref(with_image=True))
    with pytest.raises(BundleError, match="options.width"):  # the micro CLIP's text is 64 wide, not 128
        check_compatible(micro, backbone, BundleLimits())
