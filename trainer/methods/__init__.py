"""The trainer's side of each registered method (`service.methods`): its config from keyword options, its
learner, and the CLI's method flags generated from the configs' fields.

Torch-free: a spec names its learner as "module:Class", imported on first use (`build_learner`), so building
the `train` parser loads no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, asdict, fields
from typing import TYPE_CHECKING, Any

from service.methods import METHODS, MethodSpec, method
from service.methods.common import QuantizerConfig
from trainer.options import OptionSpec, config_options, merge_options

if TYPE_CHECKING:
    from service.core.backbone import Backbone
    from trainer.methods.base import Learner


def trainable() -> dict[str, MethodSpec[Any]]:
    """The registered methods that have a trainer (a config and a learner), by name."""
    return {name: spec for name, spec in METHODS.items() if spec.config is not None and spec.learner is not None}


def make_config(method_name: str, **options: Any) -> Any:
    """The method's config from keyword options; options the method does not use are refused by name."""
    config, _ = _trainer_of(method_name)
    by_name = {f.name: f for f in fields(config)}
    quantizer = by_name.get("quantizer")
    if quantizer is not None and quantizer.default_factory is not MISSING:  # flat flags → the nested config
        given = {k: options.pop(k) for k in {f.name for f in fields(QuantizerConfig)} & set(options)}
        options["quantizer"] = QuantizerConfig(**(asdict(quantizer.default_factory()) | given))
    known = set(by_name)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {method_name!r} has no option {unknown[0]!r}; its options: {sorted(known)}")
    return config(**options)


def method_options() -> dict[str, OptionSpec]:
    """Every method's config options, each once, with its default per method (QPrompt's quantizer flattened)."""
    return merge_options({name: config_options(spec.config, name) for name, spec in trainable().items()
                          if spec.config is not None})


def learner_class(method_name: str) -> type[Learner]:
    module, name = _trainer_of(method_name)[1].split(":")
    cls: type[Learner] = getattr(importlib.import_module(module), name)
    return cls


def build_learner(method_name: str, config: Any, backbone: Backbone, classnames: tuple[str, ...]) -> Learner:
    return learner_class(method_name)(config, backbone, classnames)


def _trainer_of(method_name: str) -> tuple[type, str]:
    """(config class, learner "module:Class") of a trainable method."""
    spec = method(method_name)
    if spec.config is None or spec.learner is None:
        raise ValueError(f"method {method_name!r} has nothing to train; trainable: {sorted(trainable())}")
    return spec.config, spec.learner


__all__ = ["build_learner", "learner_class", "make_config", "method_options", "trainable"]
