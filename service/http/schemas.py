"""Response bodies of the HTTP API."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from service.bundle.manifest import ClassName
from service.core.records import MAX_TEMPLATES
from service.methods.common import Template
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
    num_classes: int | None = Field(description="null while the task is not in memory on this replica (cold)")
    warm: bool = Field(True, description="whether the active version is in memory here (false: it is activated on "
                       "first use, from its stored features)")


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


# OpenAPI links: what a client (or a stateful fuzzer) can do next with the task version an answer names


def task_version_links(at: str) -> dict[str, Any]:
    """Links from an answer whose JSON at pointer `at` is a task (its `name` and `version`)."""
    task, version = f"$response.body#{at}/name", f"$response.body#{at}/version"
    return {
        "GetTask": {"operationId": "get_task", "parameters": {"task": task}},
        "ListVersions": {"operationId": "list_versions", "parameters": {"task": task}},
        "ActivateVersion": {"operationId": "activate_version", "parameters": {"task": task, "ref": version}},
        "SetCanary": {"operationId": "set_alias", "parameters": {"task": task, "alias": "canary"},
                      "requestBody": {"version": version}},
        "VersionConfig": {"operationId": "v2_version_config", "parameters": {"task": task, "version": version}},
        "VersionStats": {"operationId": "v2_version_stats", "parameters": {"task": task, "version": version}},
    }


TASK_VERSION_LINKS = task_version_links("")
ALIAS_LINKS = {
    "ActivateCanary": {"operationId": "activate_version",
                       "parameters": {"task": "$response.body#/task", "ref": "canary"}},
    "DeleteCanary": {"operationId": "delete_alias", "parameters": {"task": "$response.body#/task", "alias": "canary"}},
    "ListAliases": {"operationId": "list_aliases", "parameters": {"task": "$response.body#/task"}},
}


class TaskList(BaseModel):
    tasks: list[TaskSummary] = Field(description="in name order")
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page; null on the last page")


class LabelTask(BaseModel):
    """A zero-shot task made from class names (each through the templates, features averaged)."""

    model_config = ConfigDict(extra="forbid")
    classnames: list[ClassName] = Field(min_length=1, description="the task's classes, in answer order",
                                        examples=[["cat", "dog", "bird"]])
    templates: Annotated[list[Template], Field(min_length=1, max_length=MAX_TEMPLATES)] | None = Field(
        None, description="each with one {} for the class name; default [\"a photo of a {}.\"]",
        examples=[["a photo of a {}.", "a drawing of a {}."]])


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


class ZeroShotResponse(BaseModel):
    labels: list[str] = Field(description="the labels, as sent")
    templates: list[str] = Field(description="the templates each label went through (averaged)")
    results: list[ImageResult]


# OpenAI's embeddings and models shapes (the `openai` client reads them), as infinity-emb serves them for CLIP


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="an id from GET /v1/models", examples=["ViT-B-16"])
    input: str | list[Any] = Field(description="a text, or a list of texts; with modality image, base64 images or "
                                   "data URIs (data:image/png;base64,...)", examples=[["a photo of a cat"]])
    modality: Literal["text", "image"] = "text"
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each embedding as the base64 of little-endian float32 values")
    dimensions: int | None = Field(None, description="if given, the model's embedding size (no truncation)")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="L2-normalized; a base64 string with encoding_format base64")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="text tokens encoded, start and end tokens included; 0 for images")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="unix time the backbone was loaded")
    owned_by: str = "promptserve"
    modalities: list[str] = Field(description="what /v1/embeddings embeds with it")
    embedding_dimensions: int
    logit_scale: float = Field(description="CLIP's scale: probabilities = softmax(logit_scale × image · text)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(None, description="why the replica is not ready (e.g. the registry is unreachable)")
    registry: dict[str, Any] = Field(default_factory=dict, description="reachable, restored, error, down_since, "
                                     "last_sync")
    tasks: int = Field(description="tasks this replica serves (in the registry's index), warm or cold")
    warm_tasks: int = Field(0, description="tasks whose active version is in memory")
    feature_memory_bytes: int = Field(0, description="memory the warm tasks' heads hold")
    feature_memory_budget_bytes: int = Field(0, description="PROMPTSERVE_FEATURE_MEMORY_BYTES (0: no limit)")
    failed_tasks: dict[str, str] = Field(description="tasks whose active version could not be restored, or whose "
                                         "registry entry is damaged (aliases, version metadata), and why")
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
    # strict: JSON true is not version 1
    version: Annotated[int, Field(ge=1, strict=True)] | Annotated[str, Field(pattern=VERSION_REF_PATTERN)] = Field(
        description="a version number or another alias", examples=[3, "canary"])


class AliasList(BaseModel):
    task: str
    aliases: dict[str, int]
