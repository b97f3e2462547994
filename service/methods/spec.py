"""What a prompt method is to every layer: one `MethodSpec` subclass per method, registered once.

A spec says how the service runs the method (`kind`), what its manifest options are (a pydantic model), which
tensors its bundle holds (`tensor_rules`), how those tensors become a prompt (`class_prompt`,
`vision_prompts`, `image_model`), which backbones it fits (`check_backbone`), and how the trainer builds it
(its config dataclass and learner). Specs import without torch, so `promptserve-train --help` and `inspect`
stay fast; the few decoders that need torch's functions import them when a bundle is decoded.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

from pydantic import BaseModel, ValidationError

from service.core.records import BackboneSizes, PromptLayout

if TYPE_CHECKING:
    import torch

    from service.core.bonder import TGPTModel
    from service.core.text_encoder import PromptTextEncoder

FLOAT_DTYPES = ("F16", "BF16", "F32")
HALF_OR_FULL = ("F16", "F32")
MAX_CONTEXT_ELEMENTS = 16 * 1024 * 1024  # floats a (dequantized) context may hold: 64 MiB as float32


class Kind(str, enum.Enum):
    """How the service runs a method's tasks; one vocabulary for header, registry, heads and runtime."""

    TEXT = "text"  # class text features cached at activation; the plain image forward, shared by all such tasks
    VISION = "vision"  # class text features cached too; an image forward of its own, with vision prompts
    IMAGE_CONDITIONED = "image-conditioned"  # prompts made per image from the shared forward's tokens

    @property
    def needs_image_fingerprint(self) -> bool:
        """Whether its bundles depend on the image tower's weights (and record their fingerprint)."""
        return self is not Kind.TEXT

    @property
    def scores_any_classes(self) -> bool:
        """Whether a learned prompt can score classes it was not trained on (novel classes): it can when class
        names go through the text tower, not when a linear head holds the classes (image-conditioned)."""
        return self is not Kind.IMAGE_CONDITIONED


def describe_input(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class BundleError(ValueError):
    """A bundle violates the contract; `field` names the offending manifest field or tensor."""

    def __init__(self, field_name: str, problem: str):
        self.field = field_name
        self.problem = problem
        super().__init__(f"bundle field '{field_name}': {problem}")

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str = "") -> BundleError:
        """The first problem pydantic found, named by its field path (list indexes dropped)."""
        first = exc.errors(include_url=False)[0]
        path = ".".join(str(part) for part in first["loc"] if isinstance(part, str))
        field_name = ".".join(p for p in (prefix, path) if p) or "manifest"
        problem = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("missing", "json_invalid", "value_error"):
            problem += f" (got {describe_input(first.get('input'))})"
        return cls(field_name, problem)


@dataclass(frozen=True)
class TensorRule:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


Options = TypeVar("Options", bound=BaseModel)
OptionsOut = TypeVar("OptionsOut", bound=BaseModel, covariant=True)


class Described(Protocol[OptionsOut]):
    """What a bundle's header tells: enough for the method's rules (a `BundleHeader` or a decoded `Bundle`)."""

    @property
    def classnames(self) -> tuple[str, ...]: ...

    @property
    def prompt(self) -> PromptLayout: ...

    @property
    def options(self) -> OptionsOut: ...


class Decoded(Described[OptionsOut], Protocol[OptionsOut]):
    """A bundle with its tensors, validated against the method's `tensor_rules`."""

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...


@dataclass(frozen=True)
class ClassPrompt:
    """A decoded learned prompt, in float32: `ctx` [n_ctx, d] (or [C, n_ctx, d]) spliced around each class name,
    `fixed_text` frozen words right before the name, and `deep` [J-1, n_ctx, d] prompts that replace the context
    rows' hidden states before text blocks 1..J-1 (MaPLe)."""

    ctx: torch.Tensor
    deep: torch.Tensor | None = None
    fixed_text: str = ""


def ctx_shape(b: Described[Any]) -> tuple[int, ...]:
    """The plain context's shape: [n_ctx, d], or [C, n_ctx, d] for a class-specific one."""
    p = b.prompt
    return (len(b.classnames), p.n_ctx, p.ctx_dim) if p.class_specific else (p.n_ctx, p.ctx_dim)


class MethodSpec(Generic[Options]):
    """A method's facts. Subclasses set the class attributes and override what their bundles hold."""

    name: ClassVar[str]
    kind: ClassVar[Kind]
    options_model: ClassVar[type[BaseModel]]  # validates the manifest's `options`; feeds the published JSON Schema
    uses_context: ClassVar[bool]  # a learned context spliced into class prompts (else templates, or no class text)
    config: ClassVar[type | None] = None  # the trainer's config dataclass; None: nothing to train
    learner: ClassVar[str | None] = None  # "module:Class" of its trainer learner, imported when it trains
    train_defaults: ClassVar[Mapping[str, Any]] = {}  # its own training recipe, under the user's flags
    trains_on_descriptions: ClassVar[bool] = False  # its trainer reads per-image descriptions (--descriptions)

    def novel_classes_refusal(self) -> str | None:
        """Why this method's bundles cannot score classes they were not trained on; None when they can."""
        if self.kind.scores_any_classes:
            return None
        return (f"{self.name}'s head is one linear layer over the classes it was trained on, so it cannot score other "
                "(novel) classes: base-to-novel does not apply; use --protocol all")

    def parse_options(self, raw: Mapping[str, Any]) -> Options:
        """The manifest's options as this method's model (strict: the JSON types must be right)."""
        try:
            return cast("Options", self.options_model.model_validate(raw, strict=True))
        except ValidationError as exc:
            raise BundleError.from_validation(exc, "options") from exc

    def check(self, b: Described[Options]) -> None:
        """Rules across the manifest's fields, beyond the options model's own (raise BundleError)."""
        if self.uses_context and (b.prompt.n_ctx < 1 or b.prompt.ctx_dim < 1):
            raise BundleError("prompt.n_ctx", "this method needs n_ctx ≥ 1 and ctx_dim ≥ 1")
        if self.uses_context and math.prod(ctx_shape(b)) > MAX_CONTEXT_ELEMENTS:
            raise BundleError("prompt", f"the context would hold more than {MAX_CONTEXT_ELEMENTS} values")

    def tensor_rules(self, b: Described[Options]) -> dict[str, TensorRule]:
        """Name → shape and allowed dtypes of every tensor the bundle must hold (and no other)."""
        return {}

    def templates(self, b: Described[Options]) -> tuple[str, ...]:
        """Zero-shot templates each class name is encoded through (none for learned prompts)."""
        return ()

    def prompt_values(self, b: Described[Options]) -> int:
        """Values of the learned prompt in its served (plain) form, whatever its stored form."""
        classes = len(b.classnames) if b.prompt.class_specific else 1
        return classes * b.prompt.n_ctx * b.prompt.ctx_dim

    def check_backbone(self, b: Described[Options], sizes: BackboneSizes) -> None:
        """Refuse (BundleError) a bundle whose sizes do not fit this backbone beyond the generic checks."""

    def class_prompt(self, b: Decoded[Options], text: PromptTextEncoder | None = None) -> ClassPrompt | None:
        """The learned prompt class names are encoded with; None: plain templates (`templates`) or no class text."""
        return None

    def vision_prompts(self, b: Decoded[Options]) -> torch.Tensor | None:
        """Float32 [J, n_ctx, d_v] prompts for the image tower (vision-side methods); else None."""
        return None

    def image_model(self, b: Decoded[Options]) -> TGPTModel:
        """The per-image prompt model of an image-conditioned method, float32 in eval mode."""
        raise TypeError(f"method {self.name!r} is not image-conditioned")
