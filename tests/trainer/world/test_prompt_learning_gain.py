"""On the tiny world CLIP, a learned prompt beats the hand-written one on the classes it was trained on.

Faint images (never seen in pretraining) leave zero-shot clearly imperfect; 16 shots per base colour let
CoOp and QCoOp move the class features toward them. This fails if prompt splicing, the gradient through
the text tower, quantization or the bundle's round trip to the service's text features break.
"""

from __future__ import annotations

import pytest
import torch

from service.bundle.codec import Bundle, decode_bundle, encode_bundle
from service.bundle.manifest import Manifest
from service.core.backbone import BackboneSpec, load_backbone
from service.serving.text_features import text_features
from trainer.configs import TrainConfig
from trainer.engine import train_learner
from trainer.features import FeatureSet
from trainer.methods import build_learner, make_config
from trainer.world import FAMILIES
from trainer.world.dataset import make_dataset

pytestmark = pytest.mark.slow
BASE = tuple(FAMILIES["colour"][:8])


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))


def faint_features(backbone, per_class: int, seed: int) -> FeatureSet:
    data = [(img, label) for img, label in make_dataset("colour", per_class, seed, style="faint", size=48)
            if label < len(BASE)]
    features = backbone.encode_images(torch.stack([backbone.preprocess(img) for img, _ in data]))
    return FeatureSet(features[:, None], torch.tensor([label for _, label in data]))


def accuracy(bundle: Bundle, backbone, data: FeatureSet) -> float:
    predictions = (data.features[:, 0] @ text_features(bundle, backbone).T).argmax(dim=1)
    return (predictions == data.labels).float().mean().item()


@pytest.mark.parametrize(("method", "options"), [("coop", {}), ("qprompt", {"bits": 1})])
def test_learned_prompt_beats_zero_shot_on_base_classes(tiny, method, options):
    train, test = faint_features(tiny, 16, seed=1), faint_features(tiny, 15, seed=2)
    zero_shot = accuracy(Bundle(Manifest("zeroshot", tiny.ref(), BASE), {}), tiny, test)
    learner = build_learner(method, make_config(method, n_ctx=4, **options), tiny, BASE)
    train_learner(learner, train, TrainConfig(epochs=30, lr=0.02, seed=1))
    exported = decode_bundle(encode_bundle(*learner.export()))
    learned = accuracy(exported, tiny, test)
    assert 0.3 < zero_shot < 0.95, "the faint world should leave zero-shot room to improve"
    assert learned >= zero_shot + 0.04, (method, zero_shot, learned)
