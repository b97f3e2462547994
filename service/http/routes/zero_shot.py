"""Open vocabulary: classify images against labels sent with the request (`POST /v1/zero-shot`), as Hugging Face's
zero-shot pipeline takes `candidate_labels` (a task from a list of labels is `PUT /v1/tasks/{task}`, in v1).

A label set becomes a zero-shot task version through the same activation as an uploaded bundle (same limits),
cached by (labels, templates), and is answered by the same classify pipeline and micro-batcher.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response

from service.core.records import MAX_CLASSNAME_CHARS, MAX_TEMPLATE_CHARS
from service.http.deps import CLASSIFY_ERRORS, AppState, ClassifyAccess, State
from service.http.errors import error_responses
from service.http.observability import note_versions
from service.http.schemas import ImageResult, ZeroShotResponse, top_predictions
from service.http.uploads import JSON_IMAGES_SCHEMA, read_image_form
from service.methods import BundleError
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.zero_shot import DEFAULT_TEMPLATES

router = APIRouter()
LABELS: dict[str, Any] = {"type": "array", "minItems": 1, "uniqueItems": True, "items": {
    "type": "string", "minLength": 1, "maxLength": MAX_CLASSNAME_CHARS}, "examples": [["star", "circle", "heart"]]}
TEMPLATES: dict[str, Any] = {"type": "array", "items": {"type": "string", "maxLength": MAX_TEMPLATE_CHARS,
                                                        "pattern": r"^[^{}]*\{\}[^{}]*$"},
                             "description": 'each with one {} for the label; default ["a photo of a {}."]'}
BINARIES: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
TEXTS = {"labels": LABELS, "templates": TEMPLATES}
ZERO_SHOT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["images", "labels"],
                                       "properties": {"images": BINARIES} | TEXTS}},
    "application/json": {"schema": JSON_IMAGES_SCHEMA | {
        "required": ["images", "labels"], "properties": JSON_IMAGES_SCHEMA["properties"] | TEXTS}}}}}
OptionalTopK = Annotated[int | None, Query(ge=1, le=1000, description="predictions per image (default: every label)")]


@router.post("/v1/zero-shot", tags=["classify"], dependencies=ClassifyAccess, openapi_extra=ZERO_SHOT_BODY,
             response_model=ZeroShotResponse, responses=error_responses(*CLASSIFY_ERRORS),
             summary="Classify images against labels sent with the request (multipart 'images' + 'labels', or JSON)")
async def zero_shot(request: Request, state: State, top_k: OptionalTopK = None) -> Response:
    """Each label goes through the templates (default "a photo of a {}."); a label set's text features are
    computed once and cached, so repeating it costs nothing more than classifying."""
    state.pipeline.admit((), 1)  # queue room, before the body is read
    limits = state.tasks.limits
    with state.pipeline.incoming():
        uploads, texts = await read_image_form(request, state.settings, {"labels": limits.max_classes,
                                                                         "templates": limits.max_templates})
    if not texts["labels"]:
        raise ServiceError(422, "no_labels", "send at least one label: repeated multipart fields 'labels', or "
                           'JSON "labels": [...]', field="body.labels")
    templates = texts["templates"] or list(DEFAULT_TEMPLATES)
    task = await label_task(state, texts["labels"], templates)
    k = min(top_k or len(task.manifest.classnames), len(task.manifest.classnames))
    note_versions([(task.name, task.version)])
    (probabilities,) = await state.pipeline.classify(uploads, (task,), k)

    def answer() -> Response:
        results = [ImageResult(filename=name, predictions=p)
                   for (name, _), p in zip(uploads, top_predictions(task, probabilities, k), strict=True)]
        body = ZeroShotResponse(labels=list(task.manifest.classnames), templates=templates, results=results)
        return Response(body.model_dump_json(), media_type="application/json")

    return await anyio.to_thread.run_sync(answer)


async def label_task(state: AppState, labels: list[str], templates: list[str]) -> ActiveTask:
    """The prepared zero-shot version of a label set: cached, or encoded now in the activation worker."""
    task = state.zero_shot.cached(labels, templates)
    if task is not None:
        return task
    try:
        return await anyio.to_thread.run_sync(state.zero_shot.get, labels, templates,
                                              limiter=state.activation_limiter)
    except BundleError as exc:
        raise _label_error(exc) from exc


def _label_error(exc: BundleError) -> ServiceError:
    """A bundle fault, in the words of the request: `classnames` are the labels, `options.templates` the templates."""
    field = "templates" if exc.field.startswith("options") else "labels"
    return ServiceError(422, "invalid_labels", f"{field}: {exc.problem}", field=f"body.{field}")
