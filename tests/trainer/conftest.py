"""Trainer fixtures: datasets written to tmp dirs, and image features cached once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.backbone import Backbone
from tests.helpers import make_coop
from trainer.data import Dataset, load_coop
from trainer.features import FeatureSet, encode_samples


@pytest.fixture(scope="session")
def coop_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coop(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def coop_dataset(coop_root: Path) -> Dataset:
    return load_coop(coop_root)


@pytest.fixture(scope="session")
def train_features(backbone: Backbone, coop_dataset: Dataset) -> FeatureSet:
    """8 images × 4 classes × 2 views (clean + one augmentation)."""
    return encode_samples(backbone, coop_dataset.split("train"), views=2, seed=0)
