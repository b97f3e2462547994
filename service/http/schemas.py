"""Response bodies of the HTTP API."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import torch
from pydantic import BaseModel, Field

from service.registry.base import VERSION_REF_PATTERN
from service.serving.activation import ActiveTask


class BackboneInfo(BaseModel):
    model: str
    pretrained: str | None
    fingerprint: str


class TaskSummary(BaseModel):
    name: str
    method: str
    version: int = Field(description="the active version")
    num_classes: int


class TaskDetail(TaskSummary):
    classnames: list[str]
    bundle_bytes: int
    backbone: BackboneInfo
    prompt: dict[str, Any]
    options: dict[str, Any]
    metrics: dict[str, Any]
    created: str
    trainer_version: str | None
    activated_at: float

    @classmethod
    def of(cls, task: ActiveTask) -> TaskDetail:
        m = task.manifest
        return cls(
            name=task.name, method=m.method, version=task.version, num_classes=len(m.classnames),
            classnames=list(m.classnames), bundle_bytes=task.bundle_bytes,
            backbone=BackboneInfo(model=m.backbone.model, pretrained=m.backbone.pretrained,
                                  fingerprint=m.backbone.fingerprint),
            prompt=dataclasses.asdict(m.prompt), options=dict(m.options), metrics=dict(m.metrics), created=m.created,
            trainer_version=m.trainer_version, activated_at=task.activated_at,
        )


class TaskList(BaseModel):
    tasks: list[TaskSummary]


class Prediction(BaseModel):
    label: str
    probability: float


def top_predictions(task: ActiveTask, probabilities: torch.Tensor, top_k: int) -> list[list[Prediction]]:
    """Each image's `top_k` classes of `task`, most probable first."""
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=-1)
    names = task.manifest.classnames
    return [[Prediction(label=names[i], probability=p) for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


class ImageResult(BaseModel):
    filename: str
    predictions: list[Prediction]


class ClassifyResponse(BaseModel):
    task: str
    version: int = Field(description="the task version whose text features answered every image")
    results: list[ImageResult]


class TaskAnswer(BaseModel):
    task: str
    version: int
    predictions: list[Prediction]


class MultiImageResult(BaseModel):
    filename: str
    answers: list[TaskAnswer] = Field(description="one answer per requested task, in request order")


class MultiClassifyResponse(BaseModel):
    results: list[MultiImageResult]


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(None, description="why the replica is not ready (e.g. the registry is unreachable)")
    registry: dict[str, Any] = Field(default_factory=dict, description="reachable, restored, error, down_since, "
                                     "last_sync")
    tasks: int
    failed_tasks: dict[str, str] = Field(description="tasks whose active version could not be restored, and why")
    waiting_tasks: dict[str, str] = Field(default_factory=dict, description="tasks whose active version the "
                                          "registry could not deliver yet (retried with backoff), and why")
    backbone: dict[str, Any] = Field(description="model, fingerprint, device, image_backend; image_precision (fp32, "
                                     "bf16, int8; fp16 on CUDA) and image_precision_check (what was asked for, the "
                                     "agreement with fp32 of each reduced precision tried, and why one fell back)")


class VersionEntry(BaseModel):
    version: int
    sha256: str
    size: int
    created: float = Field(description="unix time the version was stored")
    method: str
    active: bool
    aliases: list[str]


class VersionList(BaseModel):
    task: str
    active: int | None
    aliases: dict[str, int]
    versions: list[VersionEntry] = Field(description="oldest first")


class AliasTarget(BaseModel):
    version: Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=VERSION_REF_PATTERN)] = Field(
        description="a version number or another alias", examples=[3, "canary"])


class AliasList(BaseModel):
    task: str
    aliases: dict[str, int]
