"""Torch-free records every layer shares: where a learned prompt goes (`PromptLayout`), which backbone a bundle
was made for (`BackboneRef`) and the tower sizes a bundle must fit (`BackboneSizes`), with the bounds the
bundle format puts on them. Torch-free, so the trainer's `--help` and `inspect` use them without a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from pydantic import Field, StringConstraints
from pydantic.dataclasses import dataclass as pydantic_dataclass

ClassTokenPosition = Literal["end", "middle", "front"]
CLASS_TOKEN_POSITIONS: tuple[ClassTokenPosition, ...] = get_args(ClassTokenPosition)
MAX_N_CTX = 512
MAX_CTX_DIM = 8192
MAX_CLASSNAME_CHARS = 200
MAX_TEMPLATES = 64
MAX_TEMPLATE_CHARS = 300
MAX_PROMPT_DEPTH = 64  # layers a deep (MaPLe) prompt may reach
MAX_VISION_WIDTH = 8192
FIXED_TOKENS = 3  # an image-conditioned prompt's own tokens around its rows: SOT, ".", EOT
MAX_NAME_CHARS = 256  # model names, tags, fingerprints, method and version strings

Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]


@pydantic_dataclass(frozen=True)
class BackboneRef:
    """Which frozen backbone a bundle was trained for; `fingerprint` hashes its text-tower weights.

    `image_fingerprint` hashes the image tower's weights: required by methods whose prompts depend on the image
    tower (vision-side, image-conditioned), absent (None) in text-side and older bundles.
    """

    model: Name
    pretrained: Annotated[str, StringConstraints(max_length=4096)] | None
    fingerprint: Name
    image_fingerprint: Name | None = None


@pydantic_dataclass(frozen=True)
class PromptLayout:
    """Where learned context vectors go: `n_ctx` slots of width `ctx_dim` around the class name.

    `class_specific` means one context per class (CoOp's CSC) instead of one shared by all classes.
    """

    n_ctx: Annotated[int, Field(ge=0, le=MAX_N_CTX)] = 0
    ctx_dim: Annotated[int, Field(ge=0, le=MAX_CTX_DIM)] = 0
    class_token_position: ClassTokenPosition = "end"
    class_specific: bool = False


@dataclass(frozen=True)
class BackboneSizes:
    """The sizes of a backbone's towers that decide whether a method's bundle fits it.

    `deep_prompt_depth` is how many layers deep prompts can reach (the shallower tower); `token_prompts` is
    None when prompts can be put into the image tower token-wise, else why not.
    """

    text_width: int
    context_length: int
    embed_dim: int
    vision_width: int | None
    deep_prompt_depth: int
    token_prompts: str | None
