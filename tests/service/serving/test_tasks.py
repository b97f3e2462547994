"""Activation checks and class text features of vision-side (MaPLe) bundles."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from service.bundle.codec import Bundle, decode_bundle, encode_bundle
from service.bundle.compat import check_compatible
from service.core.backbone import BackboneSpec, load_backbone
from service.methods import BundleError
from service.serving.text_features import text_features
from trainer.methods import build_learner, make_config

CLASSES = ("cat", "golden retriever", "space shuttle")


def maple_bundle(backbone, method: str = "maple", **options):
    learner = build_learner(method, make_config(method, export_dtype="float32", **options), backbone, CLASSES)
    with torch.no_grad():
        for p in learner.text_params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    return learner, decode_bundle(encode_bundle(*learner.export()))


def test_maple_bundle_is_accepted_by_the_image_tower_it_was_trained_on(deep_backbone):
    _, bundle = maple_bundle(deep_backbone)
    check_compatible(bundle, deep_backbone)


def test_maple_bundle_for_another_image_tower_is_refused_naming_the_image_fingerprint(deep_backbone):
    _, bundle = maple_bundle(deep_backbone)
    other = load_backbone(BackboneSpec("test-micro-deep", device="cpu", seed=0))
    with torch.no_grad():
        other.model.visual.proj.add_(1e-3)  # same text tower, different image tower
    assert other.fingerprint == deep_backbone.fingerprint
    with pytest.raises(BundleError) as err:
        check_compatible(bundle, other)
    assert err.value.field == "backbone.image_fingerprint"


def test_text_side_bundles_ignore_the_image_tower(deep_backbone, make_coop_bundle):
    other = load_backbone(BackboneSpec("test-micro-deep", device="cpu", seed=0))
    with torch.no_grad():
        other.model.visual.proj.add_(1e-3)
    check_compatible(decode_bundle(make_coop_bundle(deep_backbone, list(CLASSES))), other)


def test_maple_bundle_deeper_than_the_service_backbone_is_refused_naming_the_depth(deep_backbone):
    _, bundle = maple_bundle(deep_backbone)
    manifest = dataclasses.replace(bundle.manifest, options={**bundle.manifest.options, "depth": 4})
    with pytest.raises(BundleError) as err:
        check_compatible(Bundle(manifest, {}), deep_backbone)
    assert err.value.field == "options.depth"


@pytest.mark.parametrize("method", ["maple", "qmaple"])
def test_class_text_features_use_the_deep_text_prompts_as_training_does(deep_backbone, method):
    learner, bundle = maple_bundle(deep_backbone, method)
    with torch.no_grad():
        expected = learner.text_features()
    torch.testing.assert_close(text_features(bundle, deep_backbone), expected, rtol=0, atol=1e-6)
