"""Each method's defaults are its reference's recipe, the docs show exactly those, and flags override them."""

from __future__ import annotations

from tests.helpers import ROOT
from trainer.configs import recipe, recipe_table
from trainer.methods import trainable


def test_the_documented_recipe_table_is_the_codes() -> None:
    assert recipe_table(list(trainable())) in (ROOT / "docs" / "trainer.md").read_text()


def test_recipes_follow_the_reference_configs() -> None:
    coop, maple, tgpt = recipe("coop"), recipe("maple"), recipe("tgpt")
    assert (coop.optimizer, coop.lr, coop.batch_size, coop.epochs, coop.warmup, coop.warmup_lr) == (
        "sgd", 0.002, 32, 50, "constant", 1e-5)  # CoOp vit_b16_ep50_ctxv1
    assert (maple.lr, maple.batch_size, maple.epochs, maple.views) == (0.0035, 4, 5, 0)  # fresh crops every step
    assert (tgpt.optimizer, tgpt.lr, tgpt.batch_size, tgpt.iterations, tgpt.warmup, tgpt.warmup_steps) == (
        "adamw", 5e-5, 8, 12800, "linear", 100)
    assert tgpt.adam_eps == 1e-7 and tgpt.holdout == 0.25 and tgpt.views == 0
    assert recipe("qprompt") == coop and recipe("qmaple") == maple


def test_an_explicit_epoch_count_replaces_a_recipe_counted_in_iterations() -> None:
    assert recipe("tgpt", epochs=3).iterations is None and recipe("tgpt", epochs=3, iterations=7).iterations == 7
    assert recipe("coop", epochs=1).warmup_epochs == 0  # the warm-up leaves an epoch of schedule
