"""The benchmark rows' parts: baselines on frozen features, a class-specific context on other classes, the store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.bundle.codec import decode_bundle, encode_bundle
from service.core.backbone import Backbone
from trainer import baselines, protocols
from trainer.data import Dataset
from trainer.methods import build_learner, make_config


def _zero_shot(backbone: Backbone):
    return protocols.zero_shot_features(backbone, protocols.DEFAULT_TEMPLATE)


def test_heads_score_untrained_classes_as_zero_shot(backbone: Backbone, train_features) -> None:
    zero_shot = _zero_shot(backbone)
    features, labels = train_features.features, train_features.labels
    trained, others = ("red", "green", "blue", "yellow"), ("violet", "red", "teal")
    init = zero_shot(trained)
    probe = baselines.LinearHead(trained, baselines.fit_linear_probe(features, labels, init, backbone.logit_scale,
                                                                     steps=20, lr=1e-2), backbone.logit_scale,
                                 zero_shot)
    images = features[:, 0]
    expected = backbone.logit_scale * images @ torch.stack([zero_shot(others)[0], probe.weights[0],
                                                            zero_shot(others)[2]]).T
    assert torch.allclose(probe.logits(images, others), expected)
    assert not torch.allclose(probe.weights, init)  # it trained
    blend = baselines.wise_ft(probe, init, 0.5)
    assert torch.allclose(blend.weights, (probe.weights + init) / 2)
    tip = baselines.tip_adapter(features, labels, trained, backbone.logit_scale, zero_shot, held_out=2)
    novel = ("violet", "teal")  # no cache entries: exactly zero-shot
    assert torch.allclose(tip.logits(images, novel), backbone.logit_scale * images @ zero_shot(novel).T)
    assert tip.alpha in baselines.TIP_ALPHAS and tip.beta in baselines.TIP_BETAS


def test_tip_adapter_adds_its_cache_affinities_to_the_zero_shot_logits(backbone: Backbone, train_features) -> None:
    features, labels = train_features.features, train_features.labels
    names, scored = ("red", "green", "blue", "yellow"), ("yellow", "red", "violet")
    zero_shot = _zero_shot(backbone)
    keys = features[:, 0]
    tip = baselines.TipAdapter(names, keys, labels, 2.0, 3.0, backbone.logit_scale, zero_shot)
    images = features[:4, 1]
    cache = torch.exp(-3.0 * (1 - images @ keys.T))
    expected = backbone.logit_scale * images @ zero_shot(scored).T + 2.0 * torch.stack(
        [cache[:, labels == 3].sum(-1), cache[:, labels == 0].sum(-1), torch.zeros(4)], dim=-1)
    assert torch.allclose(tip.logits(images, scored), expected, atol=1e-5)


def test_a_class_specific_context_scores_other_classes_with_its_mean_context(backbone: Backbone) -> None:
    learner = build_learner("coop", make_config("coop", class_specific=True), backbone, ("red", "green"))
    with torch.no_grad():
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0)))
    bundle = decode_bundle(encode_bundle(*learner.export()))
    other = protocols.for_classes(bundle, ("blue", "yellow", "red"))
    assert not other.prompt.class_specific and other.classnames == ("blue", "yellow", "red")
    assert torch.allclose(other.tensors["ctx"], bundle.tensors["ctx"].float().mean(dim=0))
    assert protocols.for_classes(bundle, ("red", "green")) is bundle


def test_store_refuses_results_of_another_backbone(tmp_path: Path, backbone: Backbone,
                                                   other_backbone: Backbone) -> None:
    store = protocols.Store(tmp_path, backbone)
    store.put({"top1": 50.0}, "fewshot", "pets", "CoOp (CSC)", "seed1-shots16")
    assert store.get("fewshot", "pets", "CoOp (CSC)", "seed1-shots16") == {"top1": 50.0}
    assert (tmp_path / "fewshot" / "pets" / "CoOp-CSC" / "seed1-shots16.json").is_file()
    with pytest.raises(ValueError, match="results of another backbone"):
        protocols.Store(tmp_path, other_backbone)


def test_few_shot_units_are_stored_and_read_back(tmp_path: Path, backbone: Backbone, coop_dataset: Dataset,
                                                 monkeypatch) -> None:
    task = protocols.Task("colours", coop_dataset)
    store = protocols.Store(tmp_path, backbone)
    rows = {"zero-shot CLIP": protocols.zero_shot_row, "Tip-Adapter": protocols.tip_adapter_row}
    first = protocols.few_shot(task, backbone, rows, [1], [2], store)[2]
    monkeypatch.setattr(protocols, "encode_samples", lambda *a, **k: pytest.fail("a stored unit was recomputed"))
    assert protocols.few_shot(task, backbone, rows, [1], [2], store)[2] == first
    assert 0 <= first["Tip-Adapter"][0]["top1"] <= 100
