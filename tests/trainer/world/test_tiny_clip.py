"""The shipped tiny world CLIP, loaded as the service loads it, really classifies its world."""

from __future__ import annotations

import pytest
import torch

from service.bundle.codec import Bundle
from service.bundle.manifest import Manifest
from service.core.backbone import EMBEDDED_WEIGHTS, BackboneSpec, load_backbone
from service.serving.text_features import text_features
from trainer.world import FAMILIES
from trainer.world.dataset import make_dataset

WEIGHTS = EMBEDDED_WEIGHTS[("promptserve-tiny", "world-v1")]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))


def zero_shot_accuracy(backbone, family: str, style: str = "photo", per_class: int = 4) -> float:
    data = make_dataset(family, per_class, seed=4242, style=style, size=backbone.model.visual.image_size[0])
    manifest = Manifest("zeroshot", backbone.ref(), tuple(FAMILIES[family]))
    classes = text_features(Bundle(manifest, {}), backbone)
    images = backbone.encode_images(torch.stack([backbone.preprocess(image) for image, _ in data]))
    predictions = (images @ classes.T).argmax(dim=1)
    return (predictions == torch.tensor([label for _, label in data])).float().mean().item()


def test_weights_are_small_and_load_by_their_tag(tiny):
    assert WEIGHTS.stat().st_size <= 25 * 1024 * 1024
    assert tiny.ref().pretrained == "world-v1" and tiny.fingerprint.startswith("sha256:")
    assert load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu")).fingerprint == tiny.fingerprint


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_shot_is_far_above_chance_through_the_service_text_path(tiny, family):
    # chance is 1/16; a broken text encoder, tokenizer or weight load lands near it
    assert zero_shot_accuracy(tiny, family) >= 0.8


def test_random_weights_of_the_same_architecture_are_near_chance():
    random = load_backbone(BackboneSpec("promptserve-tiny", None, device="cpu"))
    assert zero_shot_accuracy(random, "shape") < 0.3


def test_demo_tasks_are_the_worlds_task_families():
    from service.serving.demo import DEMO_TASKS

    assert DEMO_TASKS == {"shapes": tuple(FAMILIES["shape"]), "colours": tuple(FAMILIES["colour"])}


def test_pretraining_text_path_equals_open_clip_encode_text(tiny):
    from service.core.text_encoder import PromptTextEncoder

    tokens = tiny.tokenizer(["a photo of a red star.", "a faint photo of a large blue heart on a light background."])
    with torch.no_grad():
        ours = PromptTextEncoder(tiny.model, tiny.tokenizer).encode_embeddings(
            tiny.model.token_embedding(tokens), tokens.argmax(dim=-1), reuse_prefix=False)
        assert torch.allclose(ours, tiny.model.encode_text(tokens), atol=1e-5)
