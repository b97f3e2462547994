"""HTTP routes. Thin: they check input, call the task manager and the backbone, and shape answers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

import anyio
import torch
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr, StringConstraints

from service.backbone import Backbone
from service.batcher import JobTooLarge, MicroBatcher, Overloaded
from service.bundle import BundleError
from service.config import Settings
from service.errors import WITH_BODY, ServiceError, error_responses, storage_error
from service.images import DecodeLimits, ImagePreprocessor, decode_images
from service.metrics import Metrics
from service.propagation import Propagator
from service.registry import TASK_NAME_PATTERN, VERSION_REF_PATTERN
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
from service.uploads import JSON_IMAGES_SCHEMA, Uploads, read_image_uploads


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
    # Decoding is bounded per process, so many concurrent requests cannot hold many decoded images at once.
    decode_limiter: anyio.CapacityLimiter
    propagation: Propagator | None = None  # keeps this replica in step with the registry; set by build_state

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
ADMIN_ERRORS = (401, 403)
CLASSIFY_ERRORS = (401, 403, 404, *WITH_BODY, 415, 422, 503)  # 401/403 only when a classify token is set

BUNDLE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
IMAGES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": JSON_IMAGES_SCHEMA}}}}


@router.get("/healthz", tags=["health"], summary="Liveness", responses=error_responses())
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


RequireRegistry = Annotated[bool, Query(description="false: stay ready through a registry outage once restored "
                                                   "(the replica keeps serving its active versions)")]
RequireTasks = Annotated[bool, Query(description="false: stay ready while some tasks failed to restore (every "
                                                "other task serves; `failed_tasks` lists them)")]


def not_ready_reason(state: AppState, *, require_registry: bool = True, require_tasks: bool = True) -> str | None:
    """Why this replica is not ready: registry unreachable or never synced, or a task that failed to restore."""
    health = state.propagation.health
    reason = health.problem()
    if reason and not require_registry and health.restored:
        reason = None
    failed = state.tasks.restore_failures
    if reason is None and require_tasks and failed:
        reason = f"{len(failed)} task(s) failed to restore: {', '.join(sorted(failed))}"
    return reason


@router.get("/readyz", tags=["health"], summary="Readiness: backbone loaded, registry reachable, tasks restored",
            responses={503: {"model": Readiness, "description": "not ready; `reason` says why"},
                       **error_responses(422)})
async def readyz(state: State, response: Response, require_registry: RequireRegistry = True,
                 require_tasks: RequireTasks = True) -> Readiness:
    health = state.propagation.health
    reason = not_ready_reason(state, require_registry=require_registry, require_tasks=require_tasks)
    response.status_code = 200 if reason is None else 503
    return Readiness(ready=reason is None, reason=reason, registry=vars(health), tasks=len(state.tasks.all()),
                     failed_tasks=state.tasks.restore_failures, backbone=state.backbone.describe())


@router.get("/v1/tasks", tags=["tasks"], summary="List active tasks", responses=error_responses())
async def list_tasks(state: State) -> TaskList:
    return TaskList(tasks=[TaskSummary(name=t.name, method=t.manifest.method, version=t.version,
                                       num_classes=len(t.manifest.classnames)) for t in state.tasks.all()])


@router.get("/v1/tasks/{task}", tags=["tasks"], summary="Describe a task's active version",
            responses=error_responses(404, 422))
async def get_task(task: TaskName, state: State) -> TaskDetail:
    return TaskDetail.of(state.tasks.get(task))


@router.post("/v1/tasks/{task}/versions", tags=["tasks"], status_code=201, dependencies=AdminOnly,
             openapi_extra=BUNDLE_BODY, summary="Upload a bundle as the task's new active version",
             responses={200: {"model": TaskDetail, "description": "identical to a stored version: that one is active"},
                        **error_responses(*ADMIN_ERRORS, *WITH_BODY, 415, 422, 503, 507)})
async def upload_bundle(task: TaskName, request: Request, response: Response, state: State) -> TaskDetail:
    """The raw bundle file is the body. It becomes active only after its text features are cached; on
    any error the previous version keeps serving. A bundle identical (sha256) to a stored version
    activates that version (200) instead of storing a copy."""
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type != "application/octet-stream":
        raise ServiceError(415, "bad_content_type",
                           f"send the bundle file as the raw body with Content-Type application/octet-stream, "
                           f"not {content_type}")
    data = await request.body()
    if not data:
        raise ServiceError(422, "empty_bundle", "the request body is empty: send the bundle file")
    try:
        active, created = await anyio.to_thread.run_sync(state.tasks.upload, task, data,
                                                         state.settings.retain_versions,
                                                         limiter=state.activation_limiter)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", str(exc), field=exc.field) from exc
    except OSError as exc:  # storing failed: nothing was activated
        raise storage_error(exc) from exc
    state.refresh_task_gauges()
    response.status_code = 201 if created else 200
    return TaskDetail.of(active)


@router.delete("/v1/tasks/{task}", tags=["tasks"], status_code=204, dependencies=AdminOnly,
               summary="Delete a task and all its versions",
               responses=error_responses(*ADMIN_ERRORS, 404, 422, 503, 507))
async def delete_task(task: TaskName, state: State) -> Response:
    try:
        await anyio.to_thread.run_sync(state.tasks.delete, task)
    except OSError as exc:
        raise storage_error(exc) from exc
    state.tasks.restore_failures.pop(task, None)
    state.metrics.forget_task(task)
    state.refresh_task_gauges()
    return Response(status_code=204)


TopK = Annotated[int, Query(ge=1, le=1000, description="predictions per image")]
PinnedVersion = Annotated[str | None, Query(pattern=VERSION_REF_PATTERN,
                                            description="answer with this version number or alias, not the active one")]
TaskNames = Annotated[list[Annotated[str, StringConstraints(pattern=TASK_NAME_PATTERN)]],
                     Query(min_length=1, max_length=64, description="tasks to answer, repeatable")]


@router.post("/v1/tasks/{task}/classify", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=IMAGES_BODY,
             response_model=ClassifyResponse, summary="Classify one or more images (multipart field 'images')",
             responses=error_responses(*CLASSIFY_ERRORS))
async def classify(task: TaskName, request: Request, state: State, top_k: TopK = 5,
                   version: PinnedVersion = None) -> Response:
    # this one version answers every image of the request
    active = state.tasks.get(task) if version is None else await _pinned(state, task, version)
    filenames, (probabilities,) = await _classify(request, state, (active,), top_k)

    def answer() -> Response:
        predictions = top_predictions(active, probabilities, top_k)
        return _json(ClassifyResponse(task=task, version=active.version, results=[
            ImageResult(filename=name, predictions=p) for name, p in zip(filenames, predictions, strict=True)]))

    return await anyio.to_thread.run_sync(answer)


@router.post("/v1/classify", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=IMAGES_BODY,
             response_model=MultiClassifyResponse, responses=error_responses(*CLASSIFY_ERRORS),
             summary="Classify images for several tasks in one micro-batched pass")
async def classify_many(request: Request, state: State, tasks: TaskNames, top_k: TopK = 5) -> Response:
    """Tasks that leave the image tower untouched share one image forward; each vision-side task adds one."""
    active = tuple(state.tasks.get(name) for name in dict.fromkeys(tasks))
    filenames, per_task = await _classify(request, state, active, top_k)

    def answer() -> Response:
        predictions = [top_predictions(t, p, top_k) for t, p in zip(active, per_task, strict=True)]
        return _json(MultiClassifyResponse(results=[
            MultiImageResult(filename=name, answers=[
                TaskAnswer(task=t.name, version=t.version, predictions=task_predictions[i])
                for t, task_predictions in zip(active, predictions, strict=True)])
            for i, name in enumerate(filenames)]))

    return await anyio.to_thread.run_sync(answer)


async def _pinned(state: AppState, task: str, ref: str) -> ActiveTask:
    """A pinned version, prepared on demand in the activation worker (and cached) if it is not at hand."""
    try:
        return await anyio.to_thread.run_sync(state.tasks.pinned, task, ref, limiter=state.activation_limiter)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", f"version {ref} of {task!r} cannot be served: {exc}") from exc


def _check_answer_size(tasks: tuple[ActiveTask, ...], images: int, top_k: int, settings: Settings) -> None:
    """Answers grow as tasks × images × top_k: refuse ones beyond the configured size."""
    predictions = images * sum(min(top_k, len(t.manifest.classnames)) for t in tasks)
    if predictions > settings.max_answer_predictions:
        raise ServiceError(413, "answer_too_large", f"{len(tasks)} task(s) × {images} image(s) × top_k={top_k} "
                           f"make {predictions} predictions; the limit is {settings.max_answer_predictions}")


def _json(model: ClassifyResponse | MultiClassifyResponse) -> Response:
    """Serialized in the calling worker thread, so a large answer never occupies the event loop."""
    return Response(model.model_dump_json(), media_type="application/json")


async def _classify(request: Request, state: AppState, tasks: tuple[ActiveTask, ...],
                    top_k: int) -> tuple[list[str], list[torch.Tensor]]:
    _check_answer_size(tasks, 1, top_k, state.settings)  # before the body is read
    _check_capacity(state)  # shed load before reading the body
    with state.batcher.incoming():
        uploads = await read_image_uploads(request, state.settings)
    return [name for name, _ in uploads], await classify_uploads(state, uploads, tasks, top_k)


async def classify_uploads(state: AppState, uploads: Uploads, tasks: tuple[ActiveTask, ...],
                           top_k: int) -> list[torch.Tensor]:
    """decode → preprocess (worker thread) → micro-batched forward → probabilities [B, C] per task."""
    _check_answer_size(tasks, len(uploads), top_k, state.settings)
    with state.batcher.incoming():  # a batch about to start waits (bounded) for this request's decoding
        pixels = await anyio.to_thread.run_sync(_decode_and_preprocess, uploads, state, limiter=state.decode_limiter)
    try:
        probabilities = await state.batcher.submit(ClassifyJob(pixels, tasks))
    except Overloaded as exc:
        raise _overloaded(exc) from exc
    except JobTooLarge as exc:
        raise ServiceError(413, "too_many_forwards", f"{exc}: send fewer images or fewer vision-side tasks at "
                           "once") from exc
    for task in tasks:
        state.metrics.images.labels(task.name).inc(len(uploads))
    return probabilities


def _check_capacity(state: AppState) -> None:
    try:
        state.batcher.check_capacity(1)
    except Overloaded as exc:
        raise _overloaded(exc) from exc


def _overloaded(exc: Overloaded) -> ServiceError:
    return ServiceError(503, "overloaded", f"{exc}; retry shortly", headers={"Retry-After": "1"})


def top_predictions(task: ActiveTask, probabilities: torch.Tensor, top_k: int) -> list[list[Prediction]]:
    top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=-1)
    names = task.manifest.classnames
    return [[Prediction(label=names[i], probability=p) for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def _decode_and_preprocess(uploads: Uploads, state: AppState) -> torch.Tensor:
    s = state.settings
    limits = DecodeLimits(s.max_image_bytes, s.max_image_pixels, s.max_request_pixels, s.max_aspect_ratio)
    return state.preprocessor.batch(decode_images(uploads, limits))
