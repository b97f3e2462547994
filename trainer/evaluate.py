"""Evaluation of a *bundle*, through the service's own request path, so trainer and service agree.

The bundle is checked against the backbone and made into its task head exactly as the service activates it
(`service.bundle.compat`, `service.serving.heads`); batches of clean-transformed images then go through the
service's runtime (the image forward its head needs, then its scores), and the prediction is the arg-max logit,
as the service ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from service.bundle.codec import Bundle
from service.bundle.compat import check_compatible
from service.core.backbone import Backbone
from service.serving.activation import ActiveTask
from service.serving.heads import build_head
from service.serving.runtime import ClassifyJob, ClassifyRuntime
from trainer.data import DataError, Dataset, Sample, open_image
from trainer.fewshot import base_novel_split
from trainer.metrics import Accuracy, accuracy, harmonic_mean


@dataclass(frozen=True)
class BaseNovelResult:
    base: Accuracy
    novel: Accuracy

    @property
    def hm(self) -> float:
        return harmonic_mean(self.base.top1, self.novel.top1)

    def as_dict(self) -> dict[str, float]:
        return {"base": self.base.top1, "novel": self.novel.top1, "hm": self.hm}


@torch.no_grad()
def predict(bundle: Bundle, backbone: Backbone, samples: list[Sample], progress: bool = False,
            batch_size: int = 64) -> torch.Tensor:
    """Top-1 class index per image, computed by the service's runtime on the backbone's clean transform."""
    check_compatible(bundle, backbone)
    task = ActiveTask("evaluation", 0, bundle.manifest, 0, build_head(bundle, backbone), 0.0)
    runtime = ClassifyRuntime(backbone)
    predictions = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluation", unit="batch", disable=not progress):
        pixels = torch.stack([backbone.preprocess(open_image(s.path)) for s in samples[start : start + batch_size]])
        ((logits,),) = runtime.logits([ClassifyJob(pixels, (task,))])
        predictions.append(logits.argmax(dim=-1))
    return torch.cat(predictions)


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
    return accuracy(predict(bundle, backbone, samples, progress), labels, len(bundle.manifest.classnames))


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
    novel_acc = evaluate(bundle.with_classnames(novel.classnames), backbone, novel.select(samples), progress)
    return BaseNovelResult(base_acc, novel_acc)
