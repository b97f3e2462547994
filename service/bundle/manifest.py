"""The bundle manifest's schema, decided once: typed models with strict types, ranges and sizes.

`service.bundle.header` parses a manifest only through these models (strict JSON mode), so every bound below is
checked in one place before anything is stored, and whatever validated can always be served back: the
free-form `options` and `metrics` hold plain JSON of bounded depth and size, with finite numbers only (each
method's own options model, `service.methods`, then types `options`). The published JSON Schema
(`docs/bundle-format.schema.json`) is generated from these models (`service.bundle.schema`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, JsonValue, StringConstraints
from pydantic.dataclasses import dataclass

from service.core.records import MAX_CLASSNAME_CHARS, BackboneRef, PromptLayout
from service.methods import method

if TYPE_CHECKING:
    from service.core.backbone import Backbone

FORMAT_NAME: Final = "promptserve.bundle"
FORMAT_VERSION = 1

MAX_CLASSES = 100_000  # format-wide; a service refuses more than its own PROMPTSERVE_MAX_CLASSES
MAX_JSON_DEPTH = 8  # of `options` / `metrics`
MAX_JSON_NODES = 4096
MAX_JSON_STRING_CHARS = 4096


def _check_json(value: JsonValue) -> JsonValue:
    """Walk `value` once (iteratively, so depth cannot exhaust the stack), bounding depth, size and numbers."""
    stack, nodes = [(value, 0)], 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nests deeper than {MAX_JSON_DEPTH} levels")
        if nodes > MAX_JSON_NODES:
            raise ValueError(f"holds more than {MAX_JSON_NODES} values")
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
        if isinstance(item, str) and len(item) > MAX_JSON_STRING_CHARS:
            raise ValueError(f"strings must be at most {MAX_JSON_STRING_CHARS} characters")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth + 1) for k in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_check_json), Field(
    description=f"plain JSON: at most {MAX_JSON_DEPTH} levels deep, {MAX_JSON_NODES} values, finite numbers, "
                f"strings of at most {MAX_JSON_STRING_CHARS} characters")]


def _check_classname(name: str) -> str:
    if not name.strip():
        raise ValueError("class names must not be blank")
    if not name.isprintable():
        raise ValueError("class names must not hold control characters")
    return name


def _check_unique(names: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for name in names:  # one pass: linear in the number of classes
        if name in seen:
            raise ValueError(f"duplicate class {name!r}")
        seen.add(name)
    return names


def _check_created(value: str) -> str:
    datetime.fromisoformat(value)  # ValueError names the problem
    return value


ClassName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASSNAME_CHARS),
                      AfterValidator(_check_classname)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    method: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    backbone: BackboneRef
    classnames: Annotated[tuple[ClassName, ...], Field(min_length=1, max_length=MAX_CLASSES),
                          AfterValidator(_check_unique)]
    prompt: PromptLayout = Field(default_factory=PromptLayout)
    options: JsonObject = Field(default_factory=dict)
    metrics: JsonObject = Field(default_factory=dict)
    created: Annotated[str, StringConstraints(max_length=64), AfterValidator(_check_created)] = Field(
        default_factory=_now)
    trainer_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    format: Literal["promptserve.bundle"] = FORMAT_NAME
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)] = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def build_manifest(method_name: str, backbone: Backbone, classnames: Iterable[str], *,
                   prompt: PromptLayout | None = None, options: Mapping[str, Any] | None = None,
                   metrics: Mapping[str, Any] | None = None, trainer_version: str | None = None) -> Manifest:
    """The manifest of a bundle made for `backbone`: its identity, with the image tower's where the method's
    prompts depend on it (the one place trainer, demo tasks and tools build a manifest)."""
    with_image = method(method_name).kind.needs_image_fingerprint
    # by keyword, so a validation error's location names the field (`classnames`), not a position
    return Manifest(method=method_name, backbone=backbone.ref(with_image=with_image), classnames=tuple(classnames),
                    prompt=prompt or PromptLayout(), options=dict(options or {}), metrics=dict(metrics or {}),
                    trainer_version=trainer_version)
