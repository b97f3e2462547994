"""The trainer's side of the one method registry: each trainable method's learner and config, and the CLI's
options generated from the configs (a clash in type is refused, not silently merged)."""

from __future__ import annotations

import dataclasses

import pytest

from service.methods import METHODS
from trainer.methods import learner_class, make_config, method_options, trainable
from trainer.options import config_options, merge_options


def test_every_registered_method_with_a_learner_is_trainable_and_zero_shot_is_not() -> None:
    assert set(trainable()) == {"coop", "qprompt", "rlp", "maple", "qmaple", "tgpt"}
    assert set(trainable()) < set(METHODS)
    with pytest.raises(ValueError, match="method 'zeroshot' has nothing to train"):
        make_config("zeroshot")


@pytest.mark.parametrize("method", sorted(trainable()))
def test_each_learner_writes_the_method_it_is_registered_under(method: str) -> None:
    assert learner_class(method).method == method


@pytest.mark.parametrize("method", sorted(trainable()))
def test_every_generated_option_of_a_method_is_accepted_by_its_config(method: str) -> None:
    """The flags are the configs' fields, so each one round-trips through make_config with its own default."""
    options = {name: spec.defaults[method] for name, spec in method_options().items() if method in spec.defaults}
    assert options and make_config(method, **options) == make_config(method)


def test_make_config_refuses_an_option_the_method_does_not_have_by_name() -> None:
    with pytest.raises(ValueError, match="method 'coop' has no option 'bits'"):
        make_config("coop", bits=2)


def test_one_option_typed_two_ways_is_refused_by_name() -> None:
    @dataclasses.dataclass
    class A:
        width: int = dataclasses.field(default=1, metadata={"help": "h"})

    @dataclasses.dataclass
    class B:
        width: str = dataclasses.field(default="x", metadata={"help": "h"})

    with pytest.raises(TypeError, match="option 'width' is typed differently by \\['a'\\] and \\['b'\\]"):
        merge_options({"a": config_options(A, "a"), "b": config_options(B, "b")})
