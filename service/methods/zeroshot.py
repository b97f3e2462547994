"""Zero-shot CLIP: each class name through hand-written templates, features averaged; nothing learned."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.core.records import MAX_TEMPLATES
from service.methods.common import Template
from service.methods.spec import Described, Kind, MethodSpec

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class ZeroShotOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    templates: Annotated[list[Template], Field(min_length=1, max_length=MAX_TEMPLATES)] = Field(
        default_factory=lambda: list(DEFAULT_TEMPLATES))


class ZeroShotSpec(MethodSpec[ZeroShotOptions]):
    name = "zeroshot"
    kind = Kind.TEXT
    options_model = ZeroShotOptions
    uses_context = False

    def templates(self, b: Described[ZeroShotOptions]) -> tuple[str, ...]:
        return tuple(b.options.templates)


SPEC = ZeroShotSpec()
