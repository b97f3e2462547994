"""TGP-T (Tan et al., 2024; EricTan7/TGP-T): image-conditioned prompts. Two Bonders turn learned queries and an
image's tokens into a category and a content prompt, each run through the frozen text tower; a linear head
classifies. No class text is encoded at activation: the bundle holds the queries, both Bonders and the head
(`service.core.bonder.TGPTModel`, whose parameters define the tensor names and shapes).

torch loads here only when a bundle's tensors are checked or decoded (the spec itself imports without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.core.records import FIXED_TOKENS, BackboneSizes
from service.methods.common import EXPORT_DTYPE_NAMES, check_export_dtype
from service.methods.spec import HALF_OR_FULL, BundleError, Decoded, Described, Kind, MethodSpec, TensorRule

if TYPE_CHECKING:
    from service.core.bonder import TGPTDims, TGPTModel

CATEGORY_TEMPLATE = "a photo of a {}."
# The reference's recipe (EricTan7/TGP-T `configs/configs/imagenet.yaml`, `processor/processor.py`): AdamW (eps 1e-7,
# wd 1e-4) at lr 5e-5, batch 8, 12,800 iterations, 100 warm-up iterations rising linearly from 1e-5, cosine; random
# resized crop + flip on every iteration; the checkpoint with the best validation accuracy is kept (here: on a
# quarter of the shots, held out).
TRAIN_DEFAULTS = {"optimizer": "adamw", "lr": 5e-5, "weight_decay": 1e-4, "adam_eps": 1e-7, "warmup": "linear",
                  "warmup_steps": 100, "batch_size": 8, "iterations": 12800, "views": 0, "holdout": 0.25}


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

    def dims(self) -> TGPTDims:
        from service.core.bonder import TGPTDims

        return TGPTDims(self.category_queries, self.content_queries, self.width, self.embed_dim, self.heads)


@dataclass
class TGPTConfig:
    category_queries: int = field(default=32, metadata={"help": "category prompt rows (nq + 3 ≤ context length)"})
    content_queries: int = field(default=64, metadata={"help": "content prompt rows (nq + 3 ≤ context length)"})
    heads: int = field(default=8, metadata={"help": "self-attention heads of each Bonder"})
    ctx_init: str | None = field(default="a photo of a", metadata={"help": "text whose embeddings start the "
                                                                           "first category queries"})
    init_std: float = field(default=0.02, metadata={"help": "std of the queries' N(0, std) init"})
    label_smoothing: float = field(default=0.1, metadata={"help": "of the token cross-entropy"})
    vocab_chunk: int = field(default=8192, metadata={"help": "vocabulary rows per chunk of the token loss"})
    templates: tuple[str, ...] = field(default=(CATEGORY_TEMPLATE,), metadata={"help": "zero-shot head init"})
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the exported tensors",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        if self.category_queries < 1 or self.content_queries < 1:
            raise ValueError("category_queries and content_queries must be ≥ 1")
        if not 0 <= self.label_smoothing < 1 or self.vocab_chunk < 1:
            raise ValueError("label_smoothing must be in [0, 1) and vocab_chunk ≥ 1")
        check_export_dtype(self.export_dtype)
        self.templates = tuple(self.templates)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("templates must be a non-empty list, each with exactly one '{}'")

    def check_context(self, context_length: int) -> None:
        for name in ("category_queries", "content_queries"):
            count = getattr(self, name)
            if count + FIXED_TOKENS > context_length:
                raise ValueError(
                    f"{name} = {count}: the prompt [SOT, {count} rows, '.', EOT] needs {count + FIXED_TOKENS} tokens "
                    f"but the text tower's context length is {context_length}; use at most "
                    f"{context_length - FIXED_TOKENS} (e.g. 8 category / 24 content queries on a 32-token tower)")


class TGPTSpec(MethodSpec[TGPTOptions]):
    name = "tgpt"
    kind = Kind.IMAGE_CONDITIONED
    options_model = TGPTOptions
    uses_context = False
    config = TGPTConfig
    learner = "trainer.methods.tgpt:TGPT"
    train_defaults = TRAIN_DEFAULTS
    trains_on_descriptions = True

    def tensor_rules(self, b: Described[TGPTOptions]) -> dict[str, TensorRule]:
        """Queries, both Bonders and the head, named and shaped as `TGPTModel` itself (F16 or F32)."""
        from service.core.bonder import tgpt_parameter_shapes

        shapes = tgpt_parameter_shapes(b.options.dims(), len(b.classnames))
        return {name: TensorRule(shape, HALF_OR_FULL) for name, shape in shapes.items()}

    def check_backbone(self, b: Described[TGPTOptions], sizes: BackboneSizes) -> None:
        options = b.options
        if sizes.token_prompts is not None:
            raise BundleError("method", f"tgpt cannot run on this backbone: {sizes.token_prompts}")
        if options.width != sizes.text_width:
            raise BundleError("options.width", f"is {options.width}, this backbone's text width is {sizes.text_width}")
        if options.embed_dim != sizes.embed_dim:
            raise BundleError("options.embed_dim", f"is {options.embed_dim}, this backbone's is {sizes.embed_dim}")
        longest = max(options.category_queries, options.content_queries)
        if longest + FIXED_TOKENS > sizes.context_length:
            raise BundleError("options", f"{longest} queries + {FIXED_TOKENS} fixed tokens exceed the text context "
                                         f"length {sizes.context_length}")

    def image_model(self, b: Decoded[TGPTOptions]) -> TGPTModel:
        """The task's float32 model in eval mode (the bundle's tensors were checked against `tensor_rules`)."""
        from service.core.bonder import TGPTModel

        model = TGPTModel(b.options.dims(), len(b.classnames))
        model.load_state_dict({name: t.float() for name, t in b.tensors.items()})
        return model.eval().requires_grad_(False)


SPEC = TGPTSpec()
