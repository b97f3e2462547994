"""Command-line options generated from config dataclasses: one flag per field, typed and documented by the field.

A field's `metadata` carries `help`, optionally `choices`, and `cli: False` for fields the CLI fills itself
(e.g. a seed taken from `--seed`). A field whose type is itself a dataclass (QPrompt's `quantizer`) contributes
its own fields, flat. The same option in several configs appears once, with each config's default in its help.
Pure and torch-free: it reads classes, it never builds a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptionSpec:
    """One flag: its value type, `nargs` ("+" for tuples), choices, help, and the default per owner."""

    name: str
    kind: type
    nargs: str | None
    choices: tuple[Any, ...] | None
    help: str
    defaults: Mapping[str, Any]  # owner (a method name, or "" for a single config) → default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def config_options(config: type, owner: str = "") -> dict[str, OptionSpec]:
    """The flags of one config dataclass (nested dataclass fields flattened), keyed by field name."""
    hints = typing.get_type_hints(config)
    specs: dict[str, OptionSpec] = {}
    for f in dataclasses.fields(config):
        if not f.metadata.get("cli", True):
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a dataclass type, not an instance
            nested = config_options(hint, owner)
            default = _default(f)
            specs |= {k: dataclasses.replace(s, defaults={owner: getattr(default, k)}) for k, s in nested.items()}
            continue
        kind, nargs, literal = _scalar(hint, f.name)
        specs[f.name] = OptionSpec(f.name, kind, nargs, f.metadata.get("choices", literal), f.metadata.get("help", ""),
                                   {owner: _default(f)})
    return specs


def merge_options(per_owner: Mapping[str, Mapping[str, OptionSpec]]) -> dict[str, OptionSpec]:
    """One spec per option name across owners; a name typed differently by two owners is refused by name."""
    merged: dict[str, OptionSpec] = {}
    for specs in per_owner.values():
        for name, spec in specs.items():
            seen = merged.get(name)
            if seen is None:
                merged[name] = spec
                continue
            if (seen.kind, seen.nargs, seen.choices) != (spec.kind, spec.nargs, spec.choices):
                raise TypeError(f"option {name!r} is typed differently by {sorted(seen.defaults)} and "
                                f"{sorted(spec.defaults)}; give it one type or another name")
            merged[name] = dataclasses.replace(seen, defaults={**seen.defaults, **spec.defaults})
    return merged


def add_options(parser: argparse.ArgumentParser | Any, specs: Mapping[str, OptionSpec], owners: int = 1) -> None:
    """Add each spec as a flag whose default is None (so each config's own default applies) and whose help
    says the default(s) and, when not every one of `owners` has the option, who has it."""
    for spec in specs.values():
        help_text = (spec.help + _default_text(spec, owners)).replace("%", "%%")  # argparse formats help
        if spec.kind is bool:
            parser.add_argument(spec.flag, action="store_true", default=None, help=help_text)
            continue
        parser.add_argument(spec.flag, type=spec.kind, nargs=spec.nargs, choices=spec.choices, default=None,
                            metavar=_metavar(spec), help=help_text)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _scalar(hint: Any, name: str) -> tuple[type, str | None, tuple[Any, ...] | None]:
    """(value type, nargs, Literal choices) of a field type; `X | None` is X, `tuple[X, ...]` is nargs "+"."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"option {name!r}: a union of {args} has no single command-line type")
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), None, choices
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], "+", None
    if hint in (int, float, str, bool):
        return hint, None, None
    raise TypeError(f"option {name!r}: type {hint!r} has no command-line form; mark it metadata={{'cli': False}}")


def _metavar(spec: OptionSpec) -> str | None:
    if spec.choices is not None:
        return "{" + ",".join(map(str, spec.choices)) + "}"
    return {int: "N", float: "X", str: "TEXT"}.get(spec.kind)


def _default_text(spec: OptionSpec, owners: int) -> str:
    """' (default: 4; maple, qmaple: 2)' — the most common default first; '[rlp] ' when only some have it."""
    by_value: dict[str, list[str]] = {}
    for owner, value in spec.defaults.items():
        by_value.setdefault(repr(value), []).append(owner)
    ranked = sorted(by_value.items(), key=lambda item: -len(item[1]))
    parts = [f"default: {ranked[0][0]}"] + [f"{', '.join(who)}: {value}" for value, who in ranked[1:]]
    scope = "" if len(spec.defaults) >= owners else f" [{', '.join(spec.defaults)}]"
    return f" ({'; '.join(parts)}){scope}"
