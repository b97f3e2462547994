"""Shared fixtures: tiny open_clip models built from the configs in tests/model_configs (random weights)."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
from pg_fixtures import postgres_url  # noqa: F401  (a fresh PostgreSQL database per test)

from service.backbone import Backbone, BackboneSpec, load_backbone

open_clip.add_model_config(Path(__file__).parent / "model_configs")

MICRO = BackboneSpec("test-micro", device="cpu", seed=0)


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    """A 77-token-context micro CLIP (random weights, seed 0), shared by every test in the session."""
    return load_backbone(MICRO)


@pytest.fixture(scope="session")
def deep_backbone() -> Backbone:
    """A micro CLIP with 3 blocks in both towers (class-token pooling), so deep prompts have depth to go."""
    return load_backbone(BackboneSpec("test-micro-deep", device="cpu", seed=0))


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """The embedded tiny CLIP (average pooling over image tokens, text context 32, embed width = text width 128:
    what TGP-T runs on)."""
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))


@pytest.fixture(scope="session")
def other_backbone() -> Backbone:
    """Same architecture, different weights: bundles made for `backbone` must be refused by it."""
    return load_backbone(BackboneSpec("test-micro", device="cpu", seed=1))


def coop_bundle(backbone: Backbone, classnames: list[str], *, n_ctx: int = 4, seed: int = 0, **overrides) -> bytes:
    """A valid CoOp bundle for `backbone` with random context (tests only need it to be well-formed)."""
    import torch

    from service.bundle import Manifest, PromptLayout, encode_bundle

    ctx = torch.randn(n_ctx, backbone.text.width, generator=torch.Generator().manual_seed(seed)) * 0.02
    manifest = Manifest(
        method="coop", backbone=backbone.ref(), classnames=tuple(classnames),
        prompt=PromptLayout(n_ctx=n_ctx, ctx_dim=backbone.text.width), **overrides,
    )
    return encode_bundle(manifest, {"ctx": ctx})


@pytest.fixture
def make_coop_bundle():
    return coop_bundle
