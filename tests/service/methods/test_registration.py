"""Adding a method is one spec, one learner and one `register` line: a method defined in this file trains through
the CLI's run path, exports, uploads and classifies through the HTTP app, with nothing else in the project changed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from service.bundle.codec import decode_bundle, encode_bundle, read_bundle
from service.core.backbone import Backbone
from service.methods import ClassPrompt, Kind, MethodSpec, TensorRule, register, unregister
from service.methods.common import PromptConfig
from service.methods.spec import Decoded, Described, ctx_shape
from service.serving.text_features import text_features
from tests.helpers import make_imagefolder, service_top1
from trainer.cli import main
from trainer.data import load_dataset
from trainer.evaluate import predict
from trainer.methods import build_learner, make_config
from trainer.methods.base import PromptLearner, initial_context

NAME = "scaled-coop"


@dataclass
class ScaledConfig(PromptConfig):
    scale: float = field(default=2.0, metadata={"help": "the stored context is multiplied by this when used"})


class ScaledOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    scale: float = Field(gt=0)


class ScaledSpec(MethodSpec[ScaledOptions]):
    """CoOp whose stored context is scaled at use: small, but with an option of its own that decoding needs."""

    name = NAME
    kind = Kind.TEXT
    options_model = ScaledOptions
    uses_context = True
    config = ScaledConfig
    learner = f"{__name__}:ScaledLearner"

    def tensor_rules(self, b: Described[ScaledOptions]) -> dict[str, TensorRule]:
        return {"ctx": TensorRule(ctx_shape(b), ("F32",))}

    def class_prompt(self, b: Decoded[ScaledOptions], text: Any = None) -> ClassPrompt:
        return ClassPrompt(b.tensors["ctx"].float() * b.options.scale)


class ScaledLearner(PromptLearner):
    method = NAME

    def __init__(self, config: ScaledConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__(config, backbone, classnames)
        self.scale = config.scale
        self.ctx = nn.Parameter(initial_context(config, backbone) / config.scale)

    def context(self) -> torch.Tensor:
        return self.ctx * self.scale

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx.detach().float().cpu()}

    def export_options(self) -> dict[str, Any]:
        return super().export_options() | {"scale": self.scale}


@pytest.fixture
def scaled_method() -> Iterator[None]:
    register(ScaledSpec())
    try:
        yield
    finally:
        unregister(NAME)


def test_a_method_defined_here_trains_exports_uploads_and_classifies(scaled_method, backbone, tmp_path: Path,
                                                                     capsys) -> None:
    data = make_imagefolder(tmp_path / "data")
    output = tmp_path / "scaled.safetensors"
    code = main(["train", "--method", NAME, "--scale", "4", "--layout", "imagefolder", "--data", str(data),
                 "--output", str(output), "--model", "test-micro", "--random-weights", "--device", "cpu",
                 "--no-progress", "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--shots", "4"])
    assert code == 0, capsys.readouterr().err
    bundle = read_bundle(output)
    assert bundle.manifest.method == NAME and isinstance(bundle.options, ScaledOptions)
    assert bundle.options.scale == 4.0 and "top1" in bundle.manifest.metrics

    samples = load_dataset(str(data), "imagefolder").split("test")
    served = service_top1(backbone, tmp_path / "registry", {"scaled": output.read_bytes()}, [s.path for s in samples])
    trained = [bundle.manifest.classnames[i] for i in predict(bundle, backbone, samples).tolist()]
    assert served["scaled"] == trained  # the service answers as the trainer's evaluation, through the new spec


def test_the_new_specs_decoder_reproduces_its_learners_class_features(scaled_method, backbone) -> None:
    learner = build_learner(NAME, make_config(NAME, scale=4.0), backbone, ("red", "green", "blue"))
    with torch.no_grad():
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        expected = learner.text_features()
    bundle = decode_bundle(encode_bundle(*learner.export()))
    torch.testing.assert_close(text_features(bundle, backbone), expected, atol=1e-6, rtol=0)


def test_registering_a_taken_name_is_refused_and_unknown_methods_are_named(scaled_method) -> None:
    with pytest.raises(ValueError, match=f"a method named '{NAME}' is already registered"):
        register(ScaledSpec())
    from service.methods import method

    with pytest.raises(ValueError, match="unknown method 'nope'; known: .*scaled-coop"):
        method("nope")
