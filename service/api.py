"""HTTP routes. Thin: they check input, call the task manager and the backbone, and shape answers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import anyio
import torch
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.backbone import Backbone
from service.batcher import MicroBatcher, Overloaded
from service.bundle import BundleError
from service.config import Settings
from service.errors import ServiceError
from service.images import ImagePreprocessor, decode_image
from service.metrics import Metrics
from service.registry import TASK_NAME_PATTERN
from service.runtime import ClassifyJob, ClassifyRuntime
from service.schemas import (
    ClassifyResponse,
    ImageResult,
    MultiClassifyResponse,
    MultiImageResult,
    Prediction,
    Readiness,
    TaskAnswer,
    TaskDetail,
    TaskList,
    TaskSummary,
)
from service.tasks import ActiveTask, TaskManager


@dataclass
class AppState:
    settings: Settings
    backbone: Backbone
    tasks: TaskManager
    metrics: Metrics
    preprocessor: ImagePreprocessor
    runtime: ClassifyRuntime
    batcher: MicroBatcher[ClassifyJob, list[torch.Tensor]]
    # Activations run in a worker thread one at a time, so the event loop stays free and a large task's
    # activation never runs twice over alongside classification.
    activation_limiter: anyio.CapacityLimiter

    def refresh_task_gauges(self) -> None:
        self.metrics.cached_tasks.set(len(self.tasks.all()))
        self.metrics.active_version.clear()
        for task in self.tasks.all():
            self.metrics.active_version.labels(task.name).set(task.version)


def get_state(request: Request) -> AppState:
    return request.app.state.promptserve


State = Annotated[AppState, Depends(get_state)]
TaskName = Annotated[str, Path(pattern=TASK_NAME_PATTERN, description="task name")]
bearer = HTTPBearer(auto_error=False, description="Bearer token from PROMPTSERVE_ADMIN_TOKEN / _CLASSIFY_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _token_matches(credentials: HTTPAuthorizationCredentials | None, *tokens: SecretStr | None) -> bool:
    given = credentials.credentials.encode() if credentials else b""
    return any(t is not None and secrets.compare_digest(given, t.get_secret_value().encode()) for t in tokens)


def _demand(credentials: HTTPAuthorizationCredentials | None, accepted: tuple[SecretStr | None, ...]) -> None:
    if credentials is None:
        raise ServiceError(401, "missing_token", "this endpoint needs 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not _token_matches(credentials, *accepted):
        raise ServiceError(403, "bad_token", "the bearer token is not valid for this endpoint")


def require_admin(state: State, credentials: Credentials) -> None:
    if state.settings.admin_token is None:
        raise ServiceError(403, "admin_disabled",
                           "uploads and deletes are disabled: start the service with PROMPTSERVE_ADMIN_TOKEN set")
    _demand(credentials, (state.settings.admin_token,))


def require_classify(state: State, credentials: Credentials) -> None:
    if state.settings.classify_token is not None:
        _demand(credentials, (state.settings.classify_token, state.settings.admin_token))


router = APIRouter()
AdminOnly = [Depends(require_admin)]
ClassifyAccess = [Depends(require_classify)]

BUNDLE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
IMAGES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


@router.get("/healthz", tags=["health"], summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], summary="Readiness: backbone loaded and tasks restored")
async def readyz(state: State) -> Readiness:
    return Readiness(ready=True, tasks=len(state.tasks.all()), failed_tasks=state.tasks.restore_failures,
                     backbone=state.backbone.describe())


@router.get("/v1/tasks", tags=["tasks"], summary="List active tasks")
async def list_tasks(state: State) -> TaskList:
    return TaskList(tasks=[TaskSummary(name=t.name, method=t.manifest.method, version=t.version,
                                       num_classes=len(t.manifest.classnames)) for t in state.tasks.all()])


@router.get("/v1/tasks/{task}", tags=["tasks"], summary="Describe a task's active version")
async def get_task(task: TaskName, state: State) -> TaskDetail:
    return TaskDetail.of(state.tasks.get(task))


@router.post("/v1/tasks/{task}/versions", tags=["tasks"], status_code=201, dependencies=AdminOnly,
             openapi_extra=BUNDLE_BODY, summary="Upload a bundle as the task's new active version")
async def upload_bundle(task: TaskName, request: Request, state: State) -> TaskDetail:
    """The raw bundle file is the body. It becomes active only after its text features are cached; on
    any error the previous version keeps serving."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise ServiceError(415, "bad_content_type",
                           f"send the bundle file as the raw body with Content-Type application/octet-stream, "
                           f"not {content_type}")
    data = await request.body()
    if not data:
        raise ServiceError(422, "empty_bundle", "the request body is empty: send the bundle file")
    try:
        active = await anyio.to_thread.run_sync(state.tasks.publish, task, data,
                                                limiter=state.activation_limiter)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", str(exc)) from exc
    state.refresh_task_gauges()
    return TaskDetail.of(active)


@router.delete("/v1/tasks/{task}", tags=["tasks"], status_code=204, dependencies=AdminOnly,
               summary="Delete a task and all its versions")
async def delete_task(task: TaskName, state: State) -> Response:
    await anyio.to_thread.run_sync(state.tasks.delete, task)
    state.refresh_task_gauges()
    return Response(status_code=204)


TopK = Annotated[int, Query(ge=1, le=1000, description="predictions per image")]
TaskNames = Annotated[list[str], Query(min_length=1, max_length=64, description="tasks to answer, repeatable")]


@router.post("/v1/tasks/{task}/classify", tags=["classify"], dependencies=ClassifyAccess,
             openapi_extra=IMAGES_BODY, summary="Classify one or more images (multipart field 'images')")
async def classify(task: TaskName, request: Request, state: State, top_k: TopK = 5) -> ClassifyResponse:
    active = state.tasks.get(task)  # this one version answers every image of the request
    filenames, (probabilities,) = await _classify(request, state, (active,))
    return ClassifyResponse(task=task, version=active.version, results=[
        ImageResult(filename=name, predictions=p)
        for name, p in zip(filenames, _top_predictions(active, probabilities, top_k), strict=True)])


@router.post("/v1/classify", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=IMAGES_BODY,
             summary="Classify images for several tasks in one micro-batched pass")
async def classify_many(request: Request, state: State, tasks: TaskNames, top_k: TopK = 5) -> MultiClassifyResponse:
    """Tasks that leave the image tower untouched share one image forward; each vision-side task adds one."""
    active = tuple(state.tasks.get(name) for name in dict.fromkeys(tasks))
    filenames, per_task = await _classify(request, state, active)
    predictions = [_top_predictions(t, p, top_k) for t, p in zip(active, per_task, strict=True)]
    return MultiClassifyResponse(results=[
        MultiImageResult(filename=name, answers=[
            TaskAnswer(task=t.name, version=t.version, predictions=task_predictions[i])
            for t, task_predictions in zip(active, predictions, strict=True)])
        for i, name in enumerate(filenames)])


async def _classify(request: Request, state: AppState,
                    tasks: tuple[ActiveTask, ...]) -> tuple[list[str], list[torch.Tensor]]:
    """decode → preprocess (worker thread) → micro-batched forward → probabilities [B, C] per task."""
    try:
        state.batcher.check_capacity(1)  # shed load before reading the body
        with state.batcher.incoming():
            uploads = await _read_image_uploads(request, state.settings)
            pixels = await anyio.to_thread.run_sync(_decode_and_preprocess, uploads, state)
        probabilities = await state.batcher.submit(ClassifyJob(pixels, tasks))
    except Overloaded as exc:
        raise ServiceError(503, "overloaded", f"{exc}; retry shortly", headers={"Retry-After": "1"}) from exc
    for task in tasks:
        state.metrics.images.labels(task.name).inc(len(uploads))
    return [name for name, _ in uploads], probabilities


def _top_predictions(task: ActiveTask, probabilities: torch.Tensor, top_k: int) -> list[list[Prediction]]:
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=-1)
    names = task.manifest.classnames
    return [[Prediction(label=names[i], probability=p) for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


async def _read_image_uploads(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServiceError(415, "bad_content_type", "send images as multipart/form-data in the field 'images'")
    try:
        form = await request.form(max_files=settings.max_images_per_request, max_fields=16,
                                  max_part_size=settings.max_image_bytes)
    except HTTPException as exc:  # Starlette reports multipart limits and syntax errors as 400s
        if "Too many files" in str(exc.detail):
            limit = settings.max_images_per_request
            raise ServiceError(413, "too_many_images", f"at most {limit} images a request") from exc
        raise ServiceError(422, "bad_multipart", f"the multipart body could not be parsed: {exc.detail}") from exc
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ServiceError(422, "no_images", "no image files in the request: use the multipart field 'images'")
        return [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def _decode_and_preprocess(uploads: list[tuple[str, bytes]], state: AppState) -> torch.Tensor:
    limits = state.settings
    images = [decode_image(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels,
                           filename=name) for name, data in uploads]
    return state.preprocessor.batch(images)
