"""RLP: ≤ 600 trainable values at rank 1 over 4×512, zero-shot at step 0, merge keeps the logits, the init is
drawn from the run seed, and the factorized bundle (≤ 1.2 KB at 4×512) serves its merged prompt's logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from service.bundle.codec import decode_bundle, encode_bundle
from service.bundle.manifest import Manifest
from service.core.backbone import BackboneSpec, load_backbone
from service.core.records import PromptLayout
from service.methods import BundleError
from service.serving.text_features import text_features
from tests.helpers import predict_from_features
from trainer.configs import TrainConfig
from trainer.engine import train_learner
from trainer.methods import build_learner, make_config
from trainer.methods.rlp import LowRankDelta


def test_rank_one_at_4x512_trains_at_most_600_parameters() -> None:
    branch = LowRankDelta(n_ctx=4, width=512, rank=1, dropout=0.1, std=None)
    count = sum(p.numel() for p in branch.parameters() if p.requires_grad)
    print(f"RLP rank 1 at 4x512: {count} trainable parameters")
    assert count == 4 + 512 <= 600


def test_learner_trains_only_the_low_rank_factors(backbone) -> None:
    learner = build_learner("rlp", make_config("rlp"), backbone, ("red", "green"))
    assert learner.trainable_parameters() == 4 * 1 + 1 * backbone.text.width
    assert not learner.base.requires_grad


def test_step_zero_equals_the_hand_written_prompt(backbone) -> None:
    classes = ("red", "green", "blue")
    learner = build_learner("rlp", make_config("rlp"), backbone, classes).train()  # dropout on: A = 0 anyway
    zero_shot = F.normalize(backbone.text.encode_texts([f"a photo of a {c}." for c in classes]), dim=-1)
    torch.testing.assert_close(learner.text_features(), zero_shot, atol=1e-5, rtol=0)


def test_merged_and_exported_prompt_give_the_factorized_logits(backbone, train_features) -> None:
    learner = build_learner("rlp", make_config("rlp", rank=2, export_format="merged"), backbone,
                            ("red", "green", "blue", "yellow"))
    with torch.no_grad():
        learner.delta.a.normal_(0, 0.5)  # a trained-looking, non-zero update
    learner.eval()
    images = train_features.features[:, 0]
    with torch.no_grad():
        factorized = learner(images)
        learner.merge()
        merged = learner(images)
        learner.unmerge()
    torch.testing.assert_close(merged, factorized, atol=1e-4, rtol=0)
    bundle = decode_bundle(encode_bundle(*learner.export()))
    prompt = bundle.class_prompt()
    served = backbone.logit_scale * images @ F.normalize(
        backbone.text.encode_classes(bundle.manifest.classnames, prompt.ctx, bundle.manifest.prompt), dim=-1).T
    torch.testing.assert_close(served, factorized, atol=1e-4, rtol=0)
    assert torch.equal(predict_from_features(bundle, backbone, images), factorized.argmax(-1))


def test_merge_refuses_non_finite_factors(backbone) -> None:
    learner = build_learner("rlp", make_config("rlp"), backbone, ("red",))
    with torch.no_grad():
        learner.delta.a.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN/inf"):
        learner.merge()


SGD = TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.2, warmup_epochs=1)


def _trained_factors(backbone, features, seed: int) -> dict[str, torch.Tensor]:
    learner = build_learner("rlp", make_config("rlp", init_seed=seed), backbone, ("red", "green", "blue", "yellow"))
    train_learner(learner, features, TrainConfig(**{**vars(SGD), "seed": seed}))
    return learner.exported_factors()


def test_runs_with_the_same_seed_repeat_exactly_and_other_seeds_differ(backbone, train_features) -> None:
    first, again, other = (_trained_factors(backbone, train_features, seed) for seed in (1, 1, 2))
    assert torch.equal(first["a"], again["a"]) and torch.equal(first["b"], again["b"])
    assert not torch.equal(first["b"], other["b"]) and not torch.equal(first["a"], other["a"])


@pytest.fixture(scope="module")
def wide():
    """Random weights, text width 512: the papers' 4×512 prompt."""
    return load_backbone(BackboneSpec("test-wide512", device="cpu", seed=0))


def _wide_learner(wide):
    learner = build_learner("rlp", make_config("rlp", init_seed=3), wide, ("red", "green", "blue"))
    with torch.no_grad():
        learner.delta.a.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))  # a trained-looking update
    return learner.eval()


def test_factorized_bundle_at_4x512_is_at_most_1_2_kb_and_serves_the_merged_prompts_logits(wide) -> None:
    learner = _wide_learner(wide)
    factorized = decode_bundle(encode_bundle(*learner.export()))
    assert factorized.payload_bytes == (4 + 512) * 2 <= 1200
    assert factorized.manifest.options["ctx_init"] == "a photo of a"
    merged_ctx = factorized.class_prompt(wide.text).ctx  # base rebuilt from the backbone + a·b
    merged = decode_bundle(encode_bundle(dataclasses.replace(factorized.manifest, options={"format": "merged"}),
                                         {"ctx": merged_ctx}))
    images = F.normalize(torch.randn(16, wide.model.text_projection.shape[1]), dim=-1)
    served = wide.logit_scale * images @ text_features(factorized, wide).T
    plain = wide.logit_scale * images @ text_features(merged, wide).T
    torch.testing.assert_close(served, plain, atol=1e-4, rtol=0)
    with torch.no_grad():  # and both are the trained learner's logits up to float16 factors
        torch.testing.assert_close(served, learner(images), atol=2e-2, rtol=0)


def test_merged_export_and_older_bundles_without_a_format_still_load(backbone) -> None:
    learner = build_learner("rlp", make_config("rlp", export_format="merged"), backbone, ("red", "green"))
    manifest, tensors = learner.export()
    assert set(tensors) == {"ctx"} and manifest.options["format"] == "merged"
    older = dataclasses.replace(manifest, options={"trainable_parameters": 68})  # written before formats existed
    bundle = decode_bundle(encode_bundle(older, tensors))
    torch.testing.assert_close(bundle.class_prompt().ctx, learner.merged_context())


@pytest.mark.parametrize(("options", "tensors", "field"), [
    ({"format": "packed"}, {"ctx": torch.zeros(4, 64)}, "options.format"),
    ({"format": "factorized", "ctx_init": "a photo of a"}, {"a": torch.zeros(4, 1), "b": torch.zeros(1, 64)},
     "options.rank"),
    ({"format": "factorized", "rank": 1}, {"a": torch.zeros(4, 1), "b": torch.zeros(1, 64)}, "options.ctx_init"),
    ({"format": "factorized", "rank": 1, "ctx_init": "a photo of a"}, {"a": torch.zeros(4, 2),
                                                                       "b": torch.zeros(2, 64)}, "a"),
    ({"format": "factorized", "rank": 1, "ctx_init": "a photo of a"}, {"ctx": torch.zeros(4, 64)}, "a"),
])
def test_malformed_factorized_bundles_are_refused_naming_the_field(backbone, options, tensors, field) -> None:
    manifest = Manifest("rlp", backbone.ref(), ("red",), PromptLayout(4, 64), options=options)
    with pytest.raises(BundleError) as caught:
        encode_bundle(manifest, tensors)
    assert caught.value.field == field


def test_init_phrase_of_another_length_than_n_ctx_is_refused_when_rebuilding(backbone) -> None:
    manifest = Manifest("rlp", backbone.ref(), ("red",), PromptLayout(4, 64),
                        options={"format": "factorized", "rank": 1, "ctx_init": "a photo"})
    bundle = decode_bundle(encode_bundle(manifest, {"a": torch.zeros(4, 1), "b": torch.zeros(1, 64)}))
    with pytest.raises(BundleError, match="2 tokens"):
        bundle.class_prompt(backbone.text)


def test_a_factorized_prompt_is_rebuilt_from_the_backbones_own_token_embeddings(backbone) -> None:
    learner = build_learner("rlp", make_config("rlp"), backbone, ("red", "green"))
    bundle = decode_bundle(encode_bundle(*learner.export()))
    torch.testing.assert_close(bundle.class_prompt(backbone.text).ctx, learner.merged_context())
    with pytest.raises(ValueError, match="pass its text encoder"):
        bundle.class_prompt()
