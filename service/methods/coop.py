"""CoOp (Zhou et al., 2022): one learned context shared by every class (or one per class), "<ctx> {class}."."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.methods.common import EXPORT_DTYPE_NAMES, NoOptions, PromptConfig, check_export_dtype
from service.methods.spec import (
    FLOAT_DTYPES,
    ClassPrompt,
    Decoded,
    Described,
    Kind,
    MethodSpec,
    TensorRule,
    ctx_shape,
)

if TYPE_CHECKING:
    from service.core.text_encoder import PromptTextEncoder


@dataclass
class CoOpConfig(PromptConfig):
    class_specific: bool = field(default=False, metadata={"help": "one context per class (CoOp's CSC) instead of "
                                                                  "one shared by all classes"})
    export_dtype: str = field(default="float16", metadata={"help": "dtype of the exported ctx",
                                                           "choices": EXPORT_DTYPE_NAMES})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_export_dtype(self.export_dtype)


class CoOpSpec(MethodSpec[NoOptions]):
    name = "coop"
    kind = Kind.TEXT
    options_model = NoOptions
    uses_context = True
    config = CoOpConfig
    learner = "trainer.methods.coop:CoOp"

    def tensor_rules(self, b: Described[NoOptions]) -> dict[str, TensorRule]:
        return {"ctx": TensorRule(ctx_shape(b), FLOAT_DTYPES)}

    def class_prompt(self, b: Decoded[NoOptions], text: PromptTextEncoder | None = None) -> ClassPrompt:
        return ClassPrompt(b.tensors["ctx"].float())


SPEC = CoOpSpec()
