"""QPrompt's adaptive re-clustering fires in real training at every bit width (tiny CLIP, faint colours).

With one fixed KL threshold it never fired at 1 bit: two bins barely change their histogram. The threshold
now scales with the bins' degrees of freedom (2^b − 1), so the default re-clusters at 1, 2 and 4 bits, and
still only when the index histogram has drifted (fewer times than `min_steps` allows).
"""

from __future__ import annotations

import pytest
import torch

from service.core.backbone import BackboneSpec, load_backbone
from trainer.configs import TrainConfig
from trainer.engine import train_learner
from trainer.features import FeatureSet
from trainer.methods import build_learner, make_config
from trainer.world import FAMILIES
from trainer.world.dataset import make_dataset

pytestmark = pytest.mark.slow
BASE = tuple(FAMILIES["colour"][:8])
EPOCHS, MIN_STEPS = 50, 10


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu"))


@pytest.fixture(scope="module")
def faint_base_colours(tiny) -> FeatureSet:
    data = [(img, label) for img, label in make_dataset("colour", 16, 1, style="faint", size=48) if label < len(BASE)]
    with torch.no_grad():
        features = tiny.encode_images(torch.stack([tiny.preprocess(img) for img, _ in data]))
    return FeatureSet(features[:, None], torch.tensor([label for _, label in data]))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_default_threshold_reclusters_during_training_at_every_bit_width(tiny, faint_base_colours, bits: int):
    learner = build_learner("qprompt", make_config("qprompt", bits=bits, min_steps=MIN_STEPS), tiny, BASE)
    train_learner(learner, faint_base_colours, TrainConfig(epochs=EPOCHS, lr=0.02, seed=1))
    steps = EPOCHS * len(faint_base_colours.labels) // 32
    count = learner.quantizer.clusterings
    print(f"{bits}-bit: {count} re-clusterings in {steps} steps")
    assert 1 <= count < steps // MIN_STEPS
    assert learner.export_options()["reclusterings"] == count
