"""The training engine: warm-up + cosine schedule, seeded determinism, fresh and cached views, iterations and
checkpoint selection on held-out shots."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.configs import TrainConfig
from trainer.engine import make_scheduler, score, train_learner
from trainer.features import Views, encode_samples
from trainer.fewshot import sample_few_shot
from trainer.fit import fit, split_holdout
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
        history = train_learner(learner, train_features, TrainConfig(epochs=2, batch_size=16, seed=seed,
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


def test_fresh_views_run_the_image_tower_every_step_and_train_too(backbone, coop_dataset, monkeypatch) -> None:
    samples = sample_few_shot(coop_dataset.split("train"), 4, seed=0)
    learner = build_learner("coop", make_config("coop"), backbone, coop_dataset.classnames)
    data = learner.training_set(samples, [None] * len(samples), Views(0))
    calls = []
    encode = backbone.encode_images
    monkeypatch.setattr(backbone, "encode_images", lambda px: calls.append(len(px)) or encode(px))
    before = learner.ctx.detach().clone()
    history = train_learner(learner, data, TrainConfig(epochs=2, batch_size=8, warmup_epochs=0))
    assert len(history) == 2 and not torch.equal(learner.ctx.detach(), before)
    assert calls == [8, 8, 8, 8]  # 16 images, batch 8, 2 epochs: one image forward per step


def _rates(cfg: TrainConfig, steps_per_epoch: int, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_linear_warm_up_rises_from_the_warm_up_rate_to_the_peak_then_decays() -> None:
    cfg = TrainConfig(lr=1e-3, warmup="linear", warmup_steps=4, warmup_lr=1e-5, iterations=12)
    rates = _rates(cfg, steps_per_epoch=100, steps=12)
    assert rates[0] == pytest.approx(1e-5) and rates[4] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(rates[:4], rates[1:5], strict=True))
    assert all(a > b for a, b in zip(rates[4:], rates[5:], strict=False))


def test_iterations_bound_the_run_whatever_the_epochs(backbone, coop_dataset, train_features, monkeypatch) -> None:
    learner = build_learner("coop", make_config("coop"), backbone, coop_dataset.classnames)
    steps: list[int] = []
    monkeypatch.setattr(learner, "after_step", lambda: steps.append(1))  # counts optimizer steps
    history = train_learner(learner, train_features, TrainConfig(epochs=50, iterations=5, batch_size=16,
                                                                 warmup_steps=1))
    assert len(steps) == 5 and len(history) == 3  # 32 images / 16 = 2 steps an epoch: 2 + 2 + 1


def test_holdout_keeps_the_last_shots_of_each_class_out_of_training() -> None:
    from trainer.data import Sample

    samples = [Sample(Path(f"{c}{i}.png"), c, str(c)) for c in range(3) for i in range(8)]
    (train, _), (held, _) = split_holdout(samples, [None] * len(samples), TrainConfig(holdout=0.25))
    assert [s.path.name for s in held] == [f"{c}{i}.png" for c in range(3) for i in (6, 7)]
    assert len(train) == 18 and not {s.path for s in train} & {s.path for s in held}
    assert split_holdout(samples[:1], [None], TrainConfig(holdout=0.5))[1] == ([], [])  # one shot: nothing held


def test_selection_restores_the_best_held_out_epoch(backbone, coop_dataset) -> None:
    samples = sample_few_shot(coop_dataset.split("train"), 8, seed=0)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=5.0, warmup_epochs=0, views=1, holdout=0.25)  # lr high: it wobbles
    fitted = fit("coop", make_config("coop"), cfg, backbone, coop_dataset.classnames, samples)
    scores = [(s.held_out, -s.held_out_loss) for s in fitted.history]
    assert fitted.held_out == 8 and fitted.trained_on == 24 and None not in [s.held_out for s in fitted.history]
    assert scores[fitted.kept_epoch - 1] == max(scores)
    held = fitted.learner.training_set(samples[6::8] + samples[7::8], [None] * 8)
    assert score(fitted.learner, held)[0] == fitted.history[fitted.kept_epoch - 1].held_out  # its weights, restored
