"""One registration per method on each side: the trainer's METHODS and the bundle's MethodSpecs name the same
methods, and the CLI's options come from the configs (a clash in type is refused, not silently merged)."""

from __future__ import annotations

import dataclasses

import pytest

from service.bundle import METHODS as BUNDLE_METHODS
from trainer.methods import METHODS, make_config, method_options
from trainer.options import config_options, merge_options

SERVICE_ONLY = {"zeroshot"}  # served from class names alone: nothing to train


def test_every_trainer_method_has_a_bundle_spec_and_every_trained_bundle_method_a_trainer() -> None:
    assert set(METHODS) == set(BUNDLE_METHODS) - SERVICE_ONLY


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_learner_writes_the_method_it_is_registered_under(method: str) -> None:
    assert METHODS[method].learner_class().method == method


@pytest.mark.parametrize("method", sorted(METHODS))
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
