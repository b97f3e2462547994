"""The training engine: warm-up + cosine schedule, seeded determinism, the image-tower loop, views."""

from __future__ import annotations

import pytest
import torch

from trainer.configs import TrainConfig
from trainer.engine import make_scheduler, train_cached, train_on_images
from trainer.features import encode_samples
from trainer.fewshot import sample_few_shot
from trainer.methods import build_learner, make_config


def test_schedule_holds_warmup_lr_then_decays_by_cosine() -> None:
    cfg = TrainConfig(epochs=5, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:2] == pytest.approx([1e-5, 1e-5])
    assert rates[2] == pytest.approx(0.002) and rates[-1] < 0.0002
    assert all(a >= b for a, b in zip(rates[2:], rates[3:], strict=False))


def test_same_seed_gives_the_same_run_and_another_seed_does_not(backbone, coop_dataset, train_features) -> None:
    def run(seed: int) -> tuple[list[float], torch.Tensor]:
        learner = build_learner("coop", make_config("coop"), backbone, coop_dataset.classnames)
        history = train_cached(learner, train_features, TrainConfig(epochs=2, batch_size=16, seed=seed,
                                                                    warmup_epochs=0, deterministic=True))
        return [s.loss for s in history], learner.ctx.detach().clone()

    try:
        (loss_a, ctx_a), (loss_b, ctx_b), (loss_c, _) = run(1), run(1), run(2)
    finally:
        torch.use_deterministic_algorithms(False)
    assert loss_a == loss_b and torch.equal(ctx_a, ctx_b)
    assert loss_a != loss_c


def test_views_are_clean_first_then_seeded_augmentations(backbone, coop_dataset) -> None:
    samples = coop_dataset.split("train")[:4]
    a = encode_samples(backbone, samples, views=3, seed=5)
    b = encode_samples(backbone, samples, views=3, seed=5)
    clean = encode_samples(backbone, samples, views=1)
    assert a.features.shape == (4, 3, backbone.model.visual.output_dim)
    assert torch.equal(a.features, b.features) and torch.equal(a.features[:, 0], clean.features[:, 0])
    assert not torch.allclose(a.features[:, 1], a.features[:, 0])


def test_plain_loop_through_the_image_tower_trains_too(backbone, coop_dataset) -> None:
    samples = sample_few_shot(coop_dataset.split("train"), 4, seed=0)
    learner = build_learner("coop", make_config("coop"), backbone, coop_dataset.classnames)
    before = learner.ctx.detach().clone()
    history = train_on_images(learner, backbone, samples, TrainConfig(epochs=2, batch_size=8, warmup_epochs=0))
    assert len(history) == 2 and not torch.equal(learner.ctx.detach(), before)
