"""RLP: ≤ 600 trainable values at rank 1 over 4×512, zero-shot at step 0, merge keeps the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.bundle import decode_bundle, encode_bundle
from trainer.evaluate import predict
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
    learner = build_learner("rlp", make_config("rlp", rank=2), backbone, ("red", "green", "blue", "yellow"))
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
    served = backbone.logit_scale * images @ F.normalize(
        backbone.text.encode_classes(bundle.manifest.classnames, bundle.context(), bundle.manifest.prompt), dim=-1).T
    torch.testing.assert_close(served, factorized, atol=1e-4, rtol=0)
    assert torch.equal(predict(bundle, backbone, images), factorized.argmax(-1))


def test_merge_refuses_non_finite_factors(backbone) -> None:
    learner = build_learner("rlp", make_config("rlp"), backbone, ("red",))
    with torch.no_grad():
        learner.delta.a.fill_(float("inf"))
    with pytest.raises(ValueError, match="NaN/inf"):
        learner.merge()
