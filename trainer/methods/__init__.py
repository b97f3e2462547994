"""Prompt methods (text-side, MaPLe's vision-side, TGP-T's image-conditioned), registered once:
name → (config class, learner class, training defaults). The CLI's method flags are generated from these
configs' fields (`method_options`); the bundle side of each method is `service.bundle.METHODS`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from service.backbone import Backbone
from trainer.methods.base import PromptConfig, PromptLearner
from trainer.methods.coop import CoOp, CoOpConfig
from trainer.methods.maple import MaPLe, MaPLeConfig
from trainer.methods.qmaple import QMaPLe, QMaPLeConfig
from trainer.methods.qprompt import QPrompt, QPromptConfig
from trainer.methods.quantizer import QuantizerConfig
from trainer.methods.rlp import RLP, RLPConfig
from trainer.methods.tgpt import TGPT, TRAIN_DEFAULTS, TGPTConfig
from trainer.options import OptionSpec, config_options, merge_options


@dataclass(frozen=True)
class MethodEntry:
    config: type
    learner: type
    train_defaults: dict[str, Any] = field(default_factory=dict)  # under the user's own training flags


METHODS: dict[str, MethodEntry] = {
    "coop": MethodEntry(CoOpConfig, CoOp),
    "qprompt": MethodEntry(QPromptConfig, QPrompt),
    "rlp": MethodEntry(RLPConfig, RLP),
    "maple": MethodEntry(MaPLeConfig, MaPLe),
    "qmaple": MethodEntry(QMaPLeConfig, QMaPLe),
    "tgpt": MethodEntry(TGPTConfig, TGPT, TRAIN_DEFAULTS),
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
    return _entry(method).learner(config, backbone, classnames)


def _entry(method: str) -> MethodEntry:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


__all__ = ["METHODS", "TGPT", "PromptConfig", "PromptLearner", "build_learner", "make_config", "method_options"]
