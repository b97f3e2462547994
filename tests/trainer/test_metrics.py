import math

import pytest
import torch

from trainer.metrics import accuracy, harmonic_mean, per_class_accuracy, top1


def test_top1_and_per_class() -> None:
    predictions, targets = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    assert top1(predictions, targets) == 75.0
    per_class = per_class_accuracy(predictions, targets, 4)
    assert per_class[:3] == (100.0, 100.0, 50.0) and math.isnan(per_class[3])
    assert accuracy(predictions, targets, 4).count == 4


def test_harmonic_mean_matches_coop_paper() -> None:
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.01)
    assert harmonic_mean(0.0, 0.0) == 0.0
