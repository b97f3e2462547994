"""v1 routes: health and readiness, tasks (list, describe, upload, delete), classify (one task or several).

Thin: they check input, call the task manager or the classify pipeline, and shape answers.
"""

from __future__ import annotations

import bisect
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
    active_task,
    pinned_task,
)
from service.http.errors import WITH_BODY, error_responses, storage_error
from service.http.jsonbody import read_body
from service.http.observability import note_versions
from service.http.schemas import (
    TASK_VERSION_LINKS,
    ClassifyResponse,
    ImageResult,
    LabelTask,
    MultiClassifyResponse,
    MultiImageResult,
    Readiness,
    TaskAnswer,
    TaskDetail,
    TaskList,
    TaskSummary,
    task_version_links,
    top_predictions,
)
from service.http.uploads import JSON_IMAGES_SCHEMA, media_type, read_image_uploads
from service.methods import BundleError
from service.registry.base import TASK_NAME_PATTERN, VERSION_REF_PATTERN, UnknownTask
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.zero_shot import zero_shot_bundle

router = APIRouter()
BUNDLE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}
IMAGES_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
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
    tasks = state.tasks
    return Readiness(ready=reason is None, reason=reason, registry=vars(health), tasks=len(tasks.names()),
                     warm_tasks=len(tasks.all()), feature_memory_bytes=tasks.warm_bytes,
                     feature_memory_budget_bytes=tasks.feature_memory_bytes,
                     failed_tasks=tasks.failed_tasks(), waiting_tasks=tasks.waiting,
                     backbone=state.backbone.describe())


PageSize = Annotated[int, Query(ge=1, le=1000, description="tasks per page")]
Cursor = Annotated[str | None, Query(pattern=TASK_NAME_PATTERN, description="the `next_cursor` of the previous page",
                                     examples=["shapes"])]


@router.get("/v1/tasks", tags=["tasks"], summary="List active tasks, a page at a time (in name order)",
            dependencies=ClassifyAccess,
            responses={200: {"description": "a page of tasks", "links": task_version_links("/tasks/0")},
                       **error_responses(*READ_ERRORS, 422)})
async def list_tasks(state: State, limit: PageSize = 100, cursor: Cursor = None) -> TaskList:
    names = state.tasks.names()
    after = names[bisect.bisect_right(names, cursor):] if cursor is not None else names
    page = after[:limit]
    summaries = [summary for name in page if (summary := _summary(state, name)) is not None]
    return TaskList(tasks=summaries, next_cursor=page[-1] if len(after) > limit else None)


def _summary(state: AppState, name: str) -> TaskSummary | None:
    """From memory for a warm task; from the registry's index for a cold one (its class count unknown here); None
    for one deleted since the page was cut."""
    try:
        listed = state.tasks.listed(name)
    except UnknownTask:
        return None
    warm = state.tasks.in_memory(name)
    if warm is not None and warm.version == listed.version:
        return TaskSummary(name=name, method=warm.manifest.method, version=warm.version,
                           num_classes=len(warm.manifest.classnames), warm=True)
    return TaskSummary(name=name, method=listed.method, version=listed.version, num_classes=None, warm=False)


@router.get("/v1/tasks/{task}", tags=["tasks"], summary="Describe a task's active version",
            dependencies=ClassifyAccess, responses=error_responses(*READ_ERRORS, 404, 422))
async def get_task(task: TaskName, state: State) -> TaskDetail:
    return TaskDetail.of(await active_task(state, task))


@router.post("/v1/tasks/{task}/versions", tags=["tasks"], status_code=201, dependencies=AdminOnly,
             openapi_extra=BUNDLE_BODY, summary="Upload a bundle as the task's new active version",
             responses={201: {"description": "stored and active", "links": TASK_VERSION_LINKS},
                        200: {"model": TaskDetail, "description": "identical to a stored version: that one is active",
                              "links": TASK_VERSION_LINKS},
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
    return await _store(state, task, data, response)


@router.put("/v1/tasks/{task}", tags=["tasks"], status_code=201, dependencies=AdminOnly,
            summary="Make a zero-shot task (or its new version) from class names, and activate it",
            responses={201: {"description": "stored and active", "links": TASK_VERSION_LINKS},
                       200: {"model": TaskDetail, "description": "identical to a stored version: that one is active",
                             "links": TASK_VERSION_LINKS},
                       **error_responses(*ADMIN_ERRORS, *WITH_BODY, 422, 503, 507)})
async def put_label_task(task: TaskName, body: LabelTask, state: State, response: Response) -> TaskDetail:
    """A zero-shot bundle built from the names (each through the templates, features averaged), then stored and
    activated exactly like an uploaded one: a new version (or the identical stored one), aliases, replicas."""
    try:
        if len(body.classnames) > state.tasks.limits.max_classes:  # before a manifest is built from them
            raise BundleError("classnames", f"{len(body.classnames)} classes exceed this service's limit "
                              f"{state.tasks.limits.max_classes}")
        data = zero_shot_bundle(state.backbone, body.classnames, body.templates)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", str(exc), field=exc.field) from exc
    return await _store(state, task, data, response)


async def _store(state: AppState, task: str, data: bytes, response: Response) -> TaskDetail:
    """Store `data` as the task's new active version (201), or re-activate the identical stored one (200)."""
    try:
        active, created = await anyio.to_thread.run_sync(state.tasks.upload, task, data,
                                                         state.settings.retain_versions,
                                                         limiter=state.activation_limiter)
    except BundleError as exc:
        raise ServiceError(422, "invalid_bundle", str(exc), field=exc.field) from exc
    except OSError as exc:  # storing failed: nothing was activated
        raise storage_error(exc) from exc
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
    state.pipeline.stats.forget(task)
    return Response(status_code=204)


TopK = Annotated[int, Query(ge=1, le=1000, description="predictions per image")]
PinnedVersion = Annotated[str | None, Query(pattern=VERSION_REF_PATTERN,
                                            description="answer with this version number or alias, not the active one")]
# a task, optionally pinned: birds@canary (an alias) or birds:3 (a version number); either separator takes either
TASK_REF_PATTERN = (f"{TASK_NAME_PATTERN.removesuffix('$')}(?:[@:]{VERSION_REF_PATTERN.removeprefix('^')[:-1]})?$")
TaskNames = Annotated[list[Annotated[str, StringConstraints(pattern=TASK_REF_PATTERN)]],
                     Query(min_length=1, max_length=64, examples=[["shapes", "colours@canary", "birds:3"]],
                           description="tasks to answer, repeatable; pin a version with task@alias or task:N")]


@router.post("/v1/tasks/{task}/classify", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=IMAGES_BODY,
             response_model=ClassifyResponse, summary="Classify one or more images (multipart field 'images')",
             responses=error_responses(*CLASSIFY_ERRORS, 429))
async def classify(task: TaskName, request: Request, state: State, top_k: TopK = 5,
                   version: PinnedVersion = None) -> Response:
    # this one version answers every image of the request
    active = await active_task(state, task) if version is None else await pinned_task(request, state, task, version)
    filenames, (probabilities,) = await _classify(request, state, (active,), top_k)

    def answer() -> Response:
        predictions = top_predictions(active, probabilities, top_k)
        return _json(ClassifyResponse(task=task, version=active.version, results=[
            ImageResult(filename=name, predictions=p) for name, p in zip(filenames, predictions, strict=True)]))

    return await anyio.to_thread.run_sync(answer)


@router.post("/v1/classify", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=IMAGES_BODY,
             response_model=MultiClassifyResponse, responses=error_responses(*CLASSIFY_ERRORS, 429),
             summary="Classify images for several tasks in one micro-batched pass")
async def classify_many(request: Request, state: State, tasks: TaskNames, top_k: TopK = 5) -> Response:
    """Tasks that leave the image tower untouched share one image forward; each vision-side task adds one."""
    active = tuple([await _task_ref(request, state, ref) for ref in dict.fromkeys(tasks)])
    filenames, per_task = await _classify(request, state, active, top_k)

    def answer() -> Response:
        predictions = [top_predictions(t, p, top_k) for t, p in zip(active, per_task, strict=True)]
        return _json(MultiClassifyResponse(results=[
            MultiImageResult(filename=name, answers=[
                TaskAnswer(task=t.name, version=t.version, predictions=task_predictions[i])
                for t, task_predictions in zip(active, predictions, strict=True)])
            for i, name in enumerate(filenames)]))

    return await anyio.to_thread.run_sync(answer)


async def _task_ref(request: Request, state: AppState, ref: str) -> ActiveTask:
    """`name` (the active version), or `name@alias` / `name:N` (that version)."""
    name, _, version = ref.replace(":", "@", 1).partition("@")
    return await pinned_task(request, state, name, version) if version else await active_task(state, name)


def _json(model: ClassifyResponse | MultiClassifyResponse) -> Response:
    """Serialized in the calling worker thread, so a large answer never occupies the event loop."""
    return Response(model.model_dump_json(), media_type="application/json")


async def _classify(request: Request, state: AppState, tasks: tuple[ActiveTask, ...],
                    top_k: int) -> tuple[list[str], list[torch.Tensor]]:
    note_versions((t.name, t.version) for t in tasks)
    state.pipeline.admit(tasks, top_k)  # before the body is read
    with state.pipeline.incoming():
        uploads = await read_image_uploads(request, state.settings)
    return [name for name, _ in uploads], await state.pipeline.classify(uploads, tasks, top_k)
