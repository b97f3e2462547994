"""v1 routes: health and readiness, tasks (list, describe, upload, delete), classify (one task or several).

Thin: they check input, call the task manager or the classify pipeline, and shape answers.
"""

from __future__ import annotations

import math
from typing import Annotated

import anyio
import torch
from fastapi import APIRouter, Query, Request, Response
from pydantic import StringConstraints

from service.http.deps import (
    ADMIN_ERRORS,
    CLASSIFY_ERRORS,
    READ_ERRORS,
    AdminOnly,
    AppState,
    ClassifyAccess,
    State,
    TaskName,
)
from service.http.errors import WITH_BODY, error_responses, storage_error
from service.http.jsonbody import read_body
from service.http.schemas import (
    ClassifyResponse,
    ImageResult,
    MultiClassifyResponse,
    MultiImageResult,
    Readiness,
    TaskAnswer,
    TaskDetail,
    TaskList,
    TaskSummary,
    top_predictions,
)
from service.http.uploads import JSON_IMAGES_SCHEMA, media_type, read_image_uploads
from service.methods import BundleError
from service.registry.base import TASK_NAME_PATTERN, VERSION_REF_PATTERN
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.preparation import PinRefused

router = APIRouter()
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


@router.get("/readyz", tags=["health"], summary="Readiness: backbone loaded, registry reachable, tasks restored",
            responses={503: {"model": Readiness, "description": "not ready; `reason` says why"},
                       **error_responses(422)})
async def readyz(state: State, response: Response, require_registry: RequireRegistry = True,
                 require_tasks: RequireTasks = True) -> Readiness:
    health = state.propagation.health
    reason = state.not_ready_reason(require_registry=require_registry, require_tasks=require_tasks)
    response.status_code = 200 if reason is None else 503
    return Readiness(ready=reason is None, reason=reason, registry=vars(health), tasks=len(state.tasks.all()),
                     failed_tasks=state.tasks.failed_tasks(), waiting_tasks=state.tasks.waiting,
                     backbone=state.backbone.describe())


@router.get("/v1/tasks", tags=["tasks"], summary="List active tasks", dependencies=ClassifyAccess,
            responses=error_responses(*READ_ERRORS))
async def list_tasks(state: State) -> TaskList:
    return TaskList(tasks=[TaskSummary(name=t.name, method=t.manifest.method, version=t.version,
                                       num_classes=len(t.manifest.classnames)) for t in state.tasks.all()])


@router.get("/v1/tasks/{task}", tags=["tasks"], summary="Describe a task's active version",
            dependencies=ClassifyAccess, responses=error_responses(*READ_ERRORS, 404, 422))
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
    content_type = media_type(request.headers, "application/octet-stream")
    if content_type != "application/octet-stream":
        raise ServiceError(415, "bad_content_type",
                           f"send the bundle file as the raw body with Content-Type application/octet-stream, "
                           f"not {content_type}")
    data = bytes(await read_body(request))
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
    state.tasks.forget_failure(task)
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
             responses=error_responses(*CLASSIFY_ERRORS, 429))
async def classify(task: TaskName, request: Request, state: State, top_k: TopK = 5,
                   version: PinnedVersion = None) -> Response:
    # this one version answers every image of the request
    active = state.tasks.get(task) if version is None else await _pinned(request, state, task, version)
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


async def _pinned(request: Request, state: AppState, task: str, ref: str) -> ActiveTask:
    """A pinned version: answered at once if it is active or prepared; else prepared by the pin worker (never
    ahead of an upload), within the client's and the task's budget (service/serving/preparation.py)."""
    state.tasks.get(task)  # 404 for a task this replica does not serve
    version = state.tasks.resolve(task, ref)
    ready = state.tasks.ready(task, version)
    if ready is not None:
        return ready
    client = request.client.host if request.client else "unknown"
    try:
        state.pins.take(client, task, state.pin_worker.queued)
    except PinRefused as exc:
        retry = max(1, math.ceil(exc.retry_after_s))
        raise ServiceError(429, "too_many_pins", f"version {version} of {task!r} is not prepared and {exc}; retry in "
                           f"{retry} s, or pin a prepared version", headers={"Retry-After": str(retry)}) from exc
    try:
        return await state.pin_worker.run(state.tasks.pinned, task, str(version))
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", f"version {ref} of {task!r} cannot be served: {exc}") from exc
    finally:
        state.pins.done(client)


def _json(model: ClassifyResponse | MultiClassifyResponse) -> Response:
    """Serialized in the calling worker thread, so a large answer never occupies the event loop."""
    return Response(model.model_dump_json(), media_type="application/json")


async def _classify(request: Request, state: AppState, tasks: tuple[ActiveTask, ...],
                    top_k: int) -> tuple[list[str], list[torch.Tensor]]:
    state.pipeline.admit(tasks, top_k)  # before the body is read
    with state.pipeline.incoming():
        uploads = await read_image_uploads(request, state.settings)
    return [name for name, _ in uploads], await state.pipeline.classify(uploads, tasks, top_k)
