"""The bundle manifest's schema, decided once: typed models with strict types, ranges and sizes.

`service.bundle` parses a manifest only through these models (strict JSON mode), so every bound below is
checked in one place before anything is stored, and whatever validated can always be served back: the
free-form `options` and `metrics` hold plain JSON of bounded depth and size, with finite numbers only.
The published JSON Schema (`docs/bundle-format.schema.json`) is generated from these models.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

FORMAT_NAME = "promptserve.bundle"
FORMAT_VERSION = 1
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# RLP bundles come in two forms (options.format): "merged" (a plain ctx, CoOp's tensors; bundles without a
# format are merged) and "factorized" (fp16 factors a [n_ctx, r] and b [r, d] plus options.ctx_init; the
# base prompt is that phrase's token embeddings, rebuilt from the backbone, so ctx = base + a·b).
RLP_FORMATS = ("merged", "factorized")
FIXED_TOKENS = 3  # TGP-T: SOT, ".", EOT around each prompt's query rows

MAX_CLASSES = 100_000  # format-wide; a service refuses more than its own PROMPTSERVE_MAX_CLASSES
MAX_CLASSNAME_CHARS = 200
MAX_N_CTX = 512
MAX_CTX_DIM = 8192
MAX_CONTEXT_ELEMENTS = 16 * 1024 * 1024  # floats a (dequantized) context may hold: 64 MiB as float32
MAX_TEMPLATES = 64
MAX_TEMPLATE_CHARS = 300
MAX_JSON_DEPTH = 8  # of `options` / `metrics`
MAX_JSON_NODES = 4096
MAX_JSON_STRING_CHARS = 4096
MAX_NAME_CHARS = 256  # model names, tags, fingerprints, method and version strings
MAX_PROMPT_DEPTH = 64  # layers a deep (MaPLe) prompt may reach
MAX_VISION_WIDTH = 8192

_STRICT = ConfigDict(strict=True)
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]


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
# Exactly one `{}` and no other braces: templates are filled with str.replace, never str.format.
Template = Annotated[str, StringConstraints(max_length=MAX_TEMPLATE_CHARS, pattern=r"^[^{}]*\{\}[^{}]*$")]


@dataclass(frozen=True)
class BackboneRef:
    """Which frozen backbone a bundle was trained for; `fingerprint` hashes its text-tower weights.

    `image_fingerprint` hashes the image tower's weights: required by vision-side methods (their prompts
    enter the image tower), absent (None) in text-side and older bundles.
    """

    model: Name
    pretrained: Annotated[str, StringConstraints(max_length=4096)] | None
    fingerprint: Name
    image_fingerprint: Name | None = None


@dataclass(frozen=True)
class PromptLayout:
    """Where learned context vectors go: `n_ctx` slots of width `ctx_dim` around the class name.

    `class_specific` means one context per class (CoOp's CSC) instead of one shared by all classes.
    """

    n_ctx: Annotated[int, Field(ge=0, le=MAX_N_CTX)] = 0
    ctx_dim: Annotated[int, Field(ge=0, le=MAX_CTX_DIM)] = 0
    class_token_position: Literal["end", "middle", "front"] = "end"
    class_specific: bool = False


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


# --- per-method options (validated after the manifest, by the method table in service.bundle) --------


class ZeroShotOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    templates: Annotated[list[Template], Field(min_length=1, max_length=MAX_TEMPLATES)] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES))


class QPromptOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    bits: Annotated[int, Field(ge=1, le=8)]


class MapleOptions(BaseModel):
    """Deep prompts: `depth` J layers of `prompt.n_ctx` tokens; `fixed_text` follows the context as plain text."""

    model_config = ConfigDict(strict=True, extra="allow")

    depth: Annotated[int, Field(ge=1, le=MAX_PROMPT_DEPTH)]
    vision_width: Annotated[int, Field(ge=1, le=MAX_VISION_WIDTH)]
    fixed_text: Annotated[str, StringConstraints(max_length=MAX_CLASSNAME_CHARS)] = ""


class QMapleOptions(MapleOptions):
    bits: Annotated[int, Field(ge=1, le=8)]


class TGPTOptions(BaseModel):
    """TGP-T's sizes (the backbone's own sizes are checked at activation); `heads` must divide `width`."""

    model_config = ConfigDict(strict=True, extra="allow")

    category_queries: Annotated[int, Field(ge=1, le=1024)]
    content_queries: Annotated[int, Field(ge=1, le=1024)]
    width: Annotated[int, Field(ge=1, le=4096)]
    embed_dim: Annotated[int, Field(ge=1, le=4096)]
    heads: Annotated[int, Field(ge=1, le=64)]

    @field_validator("heads")
    @classmethod
    def _heads_divide_width(cls, heads: int, info: ValidationInfo) -> int:
        width = info.data.get("width")
        if width and width % heads:
            raise ValueError(f"must divide options.width {width}, got {heads}")
        return heads


class RLPOptions(BaseModel):
    """"merged": a plain ctx (CoOp's tensors; bundles without a format are merged). "factorized": fp16 factors
    a [n_ctx, rank] and b [rank, d] plus `ctx_init`, the phrase whose token embeddings are the base prompt."""

    model_config = ConfigDict(strict=True, extra="allow")

    format: Literal["merged", "factorized"] = "merged"
    rank: Annotated[int, Field(ge=1, le=4096)] | None = Field(None, validate_default=True)
    ctx_init: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASSNAME_CHARS)] | None = Field(
        None, validate_default=True)

    @field_validator("rank")
    @classmethod
    def _factorized_needs_a_rank(cls, rank: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("format") == "factorized" and rank is None:
            raise ValueError("the factorized form needs the rank of its factors")
        return rank

    @field_validator("ctx_init")
    @classmethod
    def _factorized_needs_a_phrase(cls, phrase: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("format") == "factorized" and not (phrase or "").strip():
            raise ValueError("the factorized form needs the non-blank phrase its base prompt is made of")
        return phrase


class NoOptions(BaseModel):
    """Methods whose options are informational only (any bounded JSON object)."""

    model_config = ConfigDict(strict=True, extra="allow")


def describe_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
