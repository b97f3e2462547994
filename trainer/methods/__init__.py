"""Prompt methods (text-side, MaPLe's vision-side, TGP-T's image-conditioned), registered once:
name → (config class, learner, training defaults). The CLI's method flags are generated from these
configs' fields (`method_options`); the bundle side of each method is `service.bundle.METHODS`.

Torch-free: the configs live in `trainer.configs` and each learner is named "module:Class", imported on first
use (`build_learner`), so building the `train` parser loads no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from trainer.configs import (
    TGPT_TRAIN_DEFAULTS,
    CoOpConfig,
    MaPLeConfig,
    QMaPLeConfig,
    QPromptConfig,
    QuantizerConfig,
    RLPConfig,
    TGPTConfig,
)
from trainer.options import OptionSpec, config_options, merge_options

if TYPE_CHECKING:
    from service.backbone import Backbone
    from trainer.methods.base import PromptLearner
    from trainer.methods.tgpt import TGPT


@dataclass(frozen=True)
class MethodEntry:
    config: type
    learner: str  # "module:Class", imported by `learner_class`
    train_defaults: dict[str, Any] = field(default_factory=dict)  # under the user's own training flags

    def learner_class(self) -> type:
        module, name = self.learner.split(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, MethodEntry] = {
    "coop": MethodEntry(CoOpConfig, "trainer.methods.coop:CoOp"),
    "qprompt": MethodEntry(QPromptConfig, "trainer.methods.qprompt:QPrompt"),
    "rlp": MethodEntry(RLPConfig, "trainer.methods.rlp:RLP"),
    "maple": MethodEntry(MaPLeConfig, "trainer.methods.maple:MaPLe"),
    "qmaple": MethodEntry(QMaPLeConfig, "trainer.methods.qmaple:QMaPLe"),
    "tgpt": MethodEntry(TGPTConfig, "trainer.methods.tgpt:TGPT", TGPT_TRAIN_DEFAULTS),
}


def make_config(method: str, **options: Any) -> Any:
    """The method's config from keyword options; options the method does not use are refused by name."""
    entry = _entry(method)
    known = {f.name for f in fields(entry.config)}
    if "quantizer" in known:
        quantizer_default = next(f for f in fields(entry.config) if f.name == "quantizer").default_factory()
        quantizer_keys = {f.name for f in fields(QuantizerConfig)}
        given = {k: options.pop(k) for k in quantizer_keys & set(options)}
        options["quantizer"] = QuantizerConfig(**(asdict(quantizer_default) | given))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {method!r} has no option {unknown[0]!r}; its options: {sorted(known)}")
    return entry.config(**options)


def method_options() -> dict[str, OptionSpec]:
    """Every method's config options, each once, with its default per method (QPrompt's quantizer flattened)."""
    return merge_options({name: config_options(entry.config, name) for name, entry in METHODS.items()})


def build_learner(method: str, config: Any, backbone: Backbone, classnames: tuple[str, ...]) -> PromptLearner | TGPT:
    return _entry(method).learner_class()(config, backbone, classnames)


def _entry(method: str) -> MethodEntry:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


__all__ = ["METHODS", "MethodEntry", "build_learner", "make_config", "method_options"]
