"""Each method trains from cached features, its loss falls, it beats chance, and the service agrees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.bundle.codec import decode_bundle, encode_bundle
from tests.helpers import predict_from_features, service_top1
from trainer.configs import TrainConfig
from trainer.engine import train_learner
from trainer.evaluate import evaluate
from trainer.features import encode_samples
from trainer.methods import build_learner, make_config

CHANCE = 25.0  # 4 classes
RECIPES = {  # case → (method, options, training)
    "coop": ("coop", {}, TrainConfig(epochs=8, batch_size=8, warmup_epochs=0)),
    "coop-csc": ("coop", {"class_specific": True}, TrainConfig(epochs=8, batch_size=8, warmup_epochs=0)),
    "qprompt": ("qprompt", {"bits": 2, "min_steps": 4}, TrainConfig(epochs=8, batch_size=8, warmup_epochs=0)),
    "rlp": ("rlp", {}, TrainConfig(epochs=8, batch_size=8, optimizer="sgd", lr=0.2, warmup_epochs=0)),
}


@pytest.fixture(scope="module")
def trained(backbone, coop_dataset, train_features):
    """case → (learner, history, bundle bytes), each trained once for the module."""
    out = {}
    for case, (method, options, cfg) in RECIPES.items():
        learner = build_learner(method, make_config(method, **options), backbone, coop_dataset.classnames)
        history = train_learner(learner, train_features, cfg)
        out[case] = (learner, history, encode_bundle(*learner.export({"train_acc": history[-1].accuracy})))
    return out


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_loss_falls_and_training_accuracy_beats_chance(trained, method: str) -> None:
    _, history, _ = trained[method]
    print(method, [(round(s.loss, 3), round(s.accuracy)) for s in history])
    assert history[-1].loss < history[0].loss - 0.05
    assert max(s.accuracy for s in history[-3:]) > CHANCE + 20


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_exported_bundle_beats_chance_on_training_images(trained, backbone, coop_dataset, method: str) -> None:
    bundle = decode_bundle(trained[method][2])
    assert bundle.manifest.method == RECIPES[method][0] and bundle.manifest.backbone == backbone.ref()
    assert evaluate(bundle, backbone, coop_dataset.split("train")).top1 > CHANCE + 20


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_exported_bundle_reproduces_the_learners_logits(trained, train_features, method: str) -> None:
    learner, _, data = trained[method]
    images = train_features.features[:, 0]
    with torch.no_grad():
        expected = learner(images).argmax(-1)
    assert torch.equal(predict_from_features(decode_bundle(data), learner.backbone, images), expected)


def test_a_class_specific_context_has_one_row_per_class_and_is_served_as_such(trained, coop_dataset) -> None:
    learner, _, data = trained["coop-csc"]
    bundle = decode_bundle(data)
    assert bundle.prompt.class_specific and bundle.tensors["ctx"].shape == (4, 4, learner.backbone.text.width)
    rows = bundle.tensors["ctx"].float()
    assert not torch.allclose(rows[0], rows[1])  # the classes' contexts moved apart from their common start


def test_service_gives_the_trainers_top1_for_every_method(trained, backbone, coop_dataset, tmp_path: Path) -> None:
    samples = coop_dataset.split("test")
    features = encode_samples(backbone, samples).features[:, 0]
    bundles = {f"colours-{m}": data for m, (_, _, data) in trained.items()}
    served = service_top1(backbone, tmp_path / "registry", bundles, [s.path for s in samples])
    for method, (_, _, data) in trained.items():
        bundle = decode_bundle(data)
        ours = [bundle.manifest.classnames[i] for i in predict_from_features(bundle, backbone, features).tolist()]
        assert served[f"colours-{method}"] == ours, method
