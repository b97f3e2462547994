"""What a training step reads: image outputs cached once per image and view, or images encoded afresh each step.

Methods that leave the image tower untouched see the same output for a given (image, view) all through
training, so encoding every view once turns each training step into a text-tower forward and a matrix product
(`FeatureSet`, and TGP-T's token set). View 0 is the clean evaluation transform; views 1..K-1 are random
augmentations (random resized crop + horizontal flip, as the references train), drawn from a seeded generator.
`FreshSet` instead transforms and encodes each batch when it is drawn: a new augmentation every step, exactly as
the references train, at the cost of an image forward per step (MaPLe's prompted tower needs it anyway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from torchvision import transforms as T
from tqdm.auto import tqdm

from service.core.backbone import Backbone
from trainer.data import Sample, open_image

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
REFERENCE_CROP_SCALE = 0.08  # the references' random resized crop keeps 8–100 % of the image area


@dataclass(frozen=True)
class Views:
    """How a training set views its images: `count` as `TrainConfig.views` (0 fresh every step, 1 clean, K cached),
    the seed of the cached augmentations, and the smallest area share a random resized crop keeps."""

    count: int = 1
    seed: int = 0
    crop_scale: float = REFERENCE_CROP_SCALE


CLEAN = Views()  # the clean images, once each
ImageOutputs = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # pixels [B, 3, H, W] → outputs [B, ...]


class CachedSet(Protocol):
    """What the cached training loop reads: labels [N], a view count, and batches by (images, views)."""

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def views(self) -> int: ...

    def batch(self, idx: torch.Tensor, view: torch.Tensor) -> tuple[Any, torch.Tensor]: ...


@dataclass(frozen=True)
class FeatureSet:
    """Normalized image features [N, K, D] (K views per image) and labels [N]."""

    features: torch.Tensor
    labels: torch.Tensor

    @property
    def views(self) -> int:
        return self.features.shape[1]

    def batch(self, idx: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[idx, view], self.labels[idx]


@dataclass(frozen=True)
class FreshSet:
    """Images decoded once; every batch is transformed and encoded when drawn (`encode(pixels, idx)` gives the
    learner's step inputs), so an augmenting `transform` gives a new view every step."""

    images: list[Image.Image]
    labels: torch.Tensor
    transform: Transform
    encode: Callable[[torch.Tensor, torch.Tensor], Any]

    @property
    def views(self) -> int:
        return 1  # one stream of fresh views: there is nothing to choose between

    def batch(self, idx: torch.Tensor, view: torch.Tensor) -> tuple[Any, torch.Tensor]:
        pixels = torch.stack([self.transform(self.images[i]) for i in idx.tolist()])
        return self.encode(pixels, idx), self.labels[idx]


def fresh_set(backbone: Backbone, samples: list[Sample], views: Views,
              encode: Callable[[torch.Tensor, torch.Tensor], Any]) -> FreshSet:
    """A `FreshSet` of `samples`: clean images at one view, a fresh augmentation every step otherwise."""
    if not samples:
        raise ValueError("no images to train on")
    transform = backbone.preprocess if views.count == 1 else train_transform(backbone, views.crop_scale)
    return FreshSet([open_image(s.path) for s in samples], torch.tensor([s.label for s in samples]), transform,
                    encode)


def train_transform(backbone: Backbone, crop_scale: float = REFERENCE_CROP_SCALE) -> Transform:
    """Random resized crop (scale crop_scale–1) + flip at the model's input size, then its normalization."""
    cfg = backbone.model.visual.preprocess_cfg
    return T.Compose([
        T.RandomResizedCrop(cfg["size"], scale=(crop_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def view_transforms(backbone: Backbone, views: int, crop_scale: float = REFERENCE_CROP_SCALE) -> list[Transform]:
    if views < 1:
        raise ValueError(f"views must be ≥ 1, got {views}")
    return [backbone.preprocess] + [train_transform(backbone, crop_scale)] * (views - 1)


def encode_samples(
    backbone: Backbone, samples: list[Sample], views: int = 1, seed: int = 0, batch_size: int = 64,
    progress: bool = False, desc: str = "image features", encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    crop_scale: float = REFERENCE_CROP_SCALE,
) -> FeatureSet:
    """Encode every sample under `views` transforms; each image is decoded once.

    `encode` maps pixels to normalized features (default: the backbone's plain image forward).
    """
    encode = encode or backbone.encode_images
    (features,) = encode_views(lambda px: (encode(px),), backbone, samples, Views(views, seed, crop_scale), batch_size,
                               progress, desc)
    return FeatureSet(features, torch.tensor([s.label for s in samples]))


def encode_views(
    encode: ImageOutputs, backbone: Backbone, samples: list[Sample], views: Views, batch_size: int = 64,
    progress: bool = False, desc: str = "image features",
) -> tuple[torch.Tensor, ...]:
    """Every output of `encode` for every sample under `views.count` transforms, each stacked [N, K, ...]."""
    if not samples:
        raise ValueError("no images to encode")
    transforms = view_transforms(backbone, views.count, views.crop_scale)
    state = torch.random.get_rng_state()
    torch.manual_seed(views.seed)  # torchvision's random transforms draw from the global generator
    try:
        chunks = []
        for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", disable=not progress):
            images = [open_image(s.path) for s in samples[start : start + batch_size]]
            chunks.append(_encode_views(encode, images, transforms))
    finally:
        torch.random.set_rng_state(state)
    log.info("encoded %d images × %d views", len(samples), views.count)
    return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))


def _encode_views(encode: ImageOutputs, images: list[Image.Image], transforms: list[Transform]
                  ) -> tuple[torch.Tensor, ...]:
    per_view = [encode(torch.stack([t(im) for im in images])) for t in transforms]
    return tuple(torch.stack(outputs, dim=1) for outputs in zip(*per_view, strict=True))
