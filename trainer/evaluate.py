"""Evaluation of a *bundle*, through the service's own path, so trainer and service agree.

Class features come from `service.tasks.text_features` (exactly what an activated task caches); image
features from the backbone's clean transform, through the bundle's vision prompts if it has any
(`service.vision_prompts`); the prediction is the arg-max cosine, as the service ranks. TGP-T bundles are
scored through `service.tgpt` (one image forward for tokens + pooled feature, the task's Bonders, two text
passes, its head).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.backbone import Backbone
from service.bundle import Bundle
from service.tasks import text_features
from service.tgpt import encode_image_tokens, group_logits, model_from_bundle
from service.vision_prompts import prompted_image_features
from trainer.data import DataError, Dataset, Sample
from trainer.features import encode_samples, encode_views
from trainer.fewshot import base_novel_split
from trainer.metrics import Accuracy, accuracy, harmonic_mean

TGPT_NO_NOVEL = ("tgpt's head is one linear layer over the classes it was trained on, so it cannot score other "
                 "(novel) classes: base-to-novel does not apply; use --protocol all")


@dataclass(frozen=True)
class BaseNovelResult:
    base: Accuracy
    novel: Accuracy

    @property
    def hm(self) -> float:
        return harmonic_mean(self.base.top1, self.novel.top1)

    def as_dict(self) -> dict[str, float]:
        return {"base": self.base.top1, "novel": self.novel.top1, "hm": self.hm}


def with_classnames(bundle: Bundle, classnames: tuple[str, ...]) -> Bundle:
    """The same learned prompt applied to other classes (how novel classes are scored)."""
    if bundle.manifest.method == "tgpt":
        raise ValueError(TGPT_NO_NOVEL)
    if bundle.manifest.prompt.class_specific:
        raise ValueError("a class-specific context cannot be applied to other classes")
    return Bundle(dataclasses.replace(bundle.manifest, classnames=tuple(classnames)), bundle.tensors)


def image_encoder(bundle: Bundle, backbone: Backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pixels → normalized float32 features as the service computes them for this bundle's task."""
    prompts = bundle.vision_prompts()
    if prompts is None:
        return backbone.encode_images

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        batch = prompts.expand(pixels.shape[0], *prompts.shape)
        features = prompted_image_features(backbone.model.visual, pixels.to(backbone.device), batch)
        return F.normalize(features.float(), dim=-1).cpu()

    return encode


@torch.no_grad()
def predict_tgpt(bundle: Bundle, backbone: Backbone, samples: list[Sample], progress: bool = False,
                 batch_size: int = 64) -> torch.Tensor:
    """Top-1 class index per image for a TGP-T bundle, computed by the service's functions."""
    model = model_from_bundle(bundle).to(backbone.device)
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        tokens, pooled = encode_views(lambda px: _tokens_and_pooled(backbone, px), backbone, chunk, progress=progress,
                                      desc="eval tokens")
        (logits,) = group_logits(backbone.text, [model], [tokens[:, 0]], [pooled[:, 0]])
        predictions.append(logits.argmax(dim=-1).cpu())
    return torch.cat(predictions)


def _tokens_and_pooled(backbone: Backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = encode_image_tokens(backbone, pixels)
    return out.tokens, out.pooled


def predict(bundle: Bundle, backbone: Backbone, image_features: torch.Tensor) -> torch.Tensor:
    """Top-1 class index per image, ranked as the service ranks."""
    return (backbone.logit_scale * image_features @ text_features(bundle, backbone).T).argmax(dim=-1)


def relabel_for_bundle(samples: list[Sample], bundle: Bundle) -> list[Sample]:
    """Map dataset labels to the bundle's class order; a class the bundle lacks is an error naming it."""
    index = {name: i for i, name in enumerate(bundle.manifest.classnames)}
    out = []
    for s in samples:
        if s.classname not in index:
            raise DataError(f"class {s.classname!r} (image {s.path}) is not one of the bundle's classes")
        out.append(Sample(s.path, index[s.classname], s.classname))
    return out


def evaluate(bundle: Bundle, backbone: Backbone, samples: list[Sample], progress: bool = False) -> Accuracy:
    """Top-1 and per-class accuracy of `bundle` on `samples` (labelled by class name)."""
    samples = relabel_for_bundle(samples, bundle)
    labels = torch.tensor([s.label for s in samples])
    if bundle.manifest.method == "tgpt":
        return accuracy(predict_tgpt(bundle, backbone, samples, progress), labels, len(bundle.manifest.classnames))
    data = encode_samples(backbone, samples, views=1, progress=progress, desc="eval features",
                          encode=image_encoder(bundle, backbone))
    return accuracy(predict(bundle, backbone, data.features[:, 0]), labels, len(bundle.manifest.classnames))


def evaluate_base_novel(
    bundle: Bundle, backbone: Backbone, dataset: Dataset, split: str = "test", progress: bool = False
) -> BaseNovelResult:
    """CoOp's base-to-novel protocol: the bundle (trained on base classes) scored on each half separately."""
    base, novel = base_novel_split(dataset.classnames)
    if tuple(bundle.manifest.classnames) != base.classnames:
        raise DataError(
            f"the bundle's classes are not the base half of dataset {dataset.name!r} "
            f"(expected {list(base.classnames)[:5]}...); train it with --protocol base2novel"
        )
    samples = dataset.split(split)
    base_acc = evaluate(bundle, backbone, base.select(samples), progress)
    novel_acc = evaluate(with_classnames(bundle, novel.classnames), backbone, novel.select(samples), progress)
    return BaseNovelResult(base_acc, novel_acc)
