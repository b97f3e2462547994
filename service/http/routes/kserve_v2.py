"""Open Inference Protocol (KServe V2) REST routes: every task is a model, every stored version a model version.

A task takes one BYTES input `images` (encoded image files) and answers `labels` (BYTES) and `probabilities`
(FP32), both [images, k], sorted by probability; the request parameter `top_k` sets k (default: every class;
a larger k answers every class). A request for `probabilities` alone gets every class's in class order (the
labels are in `config`); an output's `classification` parameter (tritonclient's `class_count`) answers Triton's
classification extension instead: BYTES [images, k] of "score:index:label", best first.
Tensor data travels as JSON or, with Triton's binary tensor extension (what `tritonclient` sends by default),
as raw bytes after the JSON header, whose length is the `Inference-Header-Content-Length` header. In JSON,
a BYTES element is the image's base64 (JSON strings cannot carry raw image bytes). Triton's model
configuration and statistics extensions are served too (`/config`, `/stats`).

Inference goes through the classify request path (same limits, same micro-batcher); errors keep the service's
codes and add the protocol's `error` field, which V2 clients read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from service import __version__
from service.http.deps import (
    CLASSIFY_ERRORS,
    READ_ERRORS,
    AppState,
    ClassifyAccess,
    State,
    TaskName,
    active_task,
    pinned_task,
)
from service.http.errors import WITH_BODY, error_body, error_responses, summarize_errors
from service.http.jsonbody import parse_json, read_body
from service.http.observability import note_versions
from service.http.uploads import check_image_count, decode_base64_image
from service.registry.base import VERSION_REF_PATTERN, RegistryUnavailable, UnknownTask
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.pipeline import Uploads
from service.serving.stats import Duration, VersionStats

INPUT = "images"
OUTPUTS = ("labels", "probabilities")
HEADER_LENGTH = "Inference-Header-Content-Length"
LENGTH_PREFIX = struct.Struct("<I")  # a BYTES element in binary form: its length, then its bytes
_LENGTH = re.compile(r"[0-9]{1,12}")  # ASCII digits only: str.isdigit would take '²' and '١'


class V2Route(APIRoute):
    """Errors as the protocol's `{"error": ...}` body (plus the service's `code`), from every V2 route."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return _error(exc.status, exc.code, exc.message, exc.headers)
            except UnknownTask as exc:
                return _error(404, "unknown_task", exc.args[0])
            except RequestValidationError as exc:
                return _error(422, "bad_request", summarize_errors(exc.errors()))

        return handle


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, code, v2=True), status_code=status, headers=headers)


router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=V2Route,
                   generate_unique_id_function=lambda route: f"v2_{route.name}")
MODEL_ERRORS = error_responses(404, 422, 429, v2=True)
# a path's {version} that is not prepared is prepared on demand, within the pin budget (429 beyond it)
GUARDED_MODEL_ERRORS = error_responses(*READ_ERRORS, 404, 422, 429, v2=True)


class V2Readiness(BaseModel):
    ready: bool


class InputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


@router.get("/health/live", summary="Server liveness", responses=error_responses(v2=True))
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness: registry reachable and every task restored (as /readyz)",
            response_model=V2Readiness,
            responses={503: {"model": V2Readiness, "description": "not ready"}, **error_responses(v2=True)})
async def ready(state: State) -> JSONResponse:
    is_ready = state.not_ready_reason() is None
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


# Only what is implemented: repository load/unload are not (tasks change through the v1 API), so the model
# repository extension is not claimed, though its index answers.
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]


@router.get("", summary="Server metadata", responses=error_responses(v2=True))
async def server_metadata() -> dict[str, Any]:
    return {"name": "promptserve", "version": __version__, "extensions": EXTENSIONS}


async def model_version(task: TaskName, request: Request, state: State) -> ActiveTask:
    """The task's active version, or the stored version (number or alias) a path's {version} names; that one
    version answers the whole request."""
    version = request.path_params.get("version")
    if version is None:
        return await active_task(state, task)
    if not re.fullmatch(VERSION_REF_PATTERN, version):
        raise ServiceError(404, "unknown_version", f"task '{task}' has no version {version!r}")
    return await pinned_task(request, state, task, version)


Model = Annotated[ActiveTask, Depends(model_version)]
VERSION = "/models/{task}/versions/{version}"  # each model route also answers for a stored version
VERSION_PARAMETER = {"parameters": [{"name": "version", "in": "path", "required": True, "schema": {
    "type": "string", "pattern": VERSION_REF_PATTERN, "examples": ["1"]},
    "description": "a stored version's number (or an alias, as v1 pins them)"}]}


@router.get("/models/stats", summary="Inference statistics of every model (Triton's statistics extension)",
            dependencies=ClassifyAccess, responses=error_responses(*READ_ERRORS, v2=True))
async def all_stats(state: State) -> dict[str, Any]:
    return {"model_stats": [entry for task in state.tasks.names() for entry in _model_stats(state, task)]}


@router.get("/models/{task}/stats", summary="Inference statistics of a model's versions", dependencies=ClassifyAccess,
            responses=GUARDED_MODEL_ERRORS)
async def model_stats(task: TaskName, state: State) -> dict[str, Any]:
    state.tasks.listed(task)  # 404 for an unknown task
    return {"model_stats": _model_stats(state, task)}


@router.get(f"{VERSION}/stats", summary="Inference statistics of one stored version", name="version_stats",
            openapi_extra=VERSION_PARAMETER, dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
async def version_stats(active: Model, state: State) -> dict[str, Any]:
    return {"model_stats": _model_stats(state, active.name, only=active.version)}


def _model_stats(state: AppState, task: str, only: int | None = None) -> list[dict[str, Any]]:
    """Triton's statistics entries: every version that answered (and the active one, at zero, if it has not)."""
    recorded = state.pipeline.stats.of(task)
    active = state.tasks.active_version(task)
    versions = [only] if only is not None else sorted({*recorded, *([] if active is None else [active])})
    return [_stats_entry(task, version, recorded.get(version, VersionStats())) for version in versions]


def _stats_entry(task: str, version: int, stats: VersionStats) -> dict[str, Any]:
    def duration(d: Duration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    phases = {name: duration(getattr(stats, name)) for name in (
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
    return {"name": task, "version": str(version), "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": phases | {"cache_hit": duration(Duration()), "cache_miss": duration(Duration())},
            "batch_stats": [], "memory_usage": []}


@router.get("/models/{task}", summary="Model metadata: a task's input, outputs and stored versions",
            dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
@router.get(VERSION, summary="Model metadata of a stored version", openapi_extra=VERSION_PARAMETER,
            name="version_metadata", dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
async def model_metadata(active: Model, request: Request, state: State) -> dict[str, Any]:
    versions = [active.version]
    if "version" not in request.path_params:
        try:
            versions = [v.version for v in await anyio.to_thread.run_sync(state.tasks.versions, active.name)]
        except RegistryUnavailable:  # through an outage, the version this replica serves is all it can vouch for
            pass
    return {
        "name": active.name, "versions": [str(v) for v in versions],
        "platform": f"promptserve_{active.manifest.method}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {"classes": len(active.manifest.classnames), "version": active.version},
    }


@router.get("/models/{task}/config", summary="Model configuration (Triton's): inputs, outputs, batching, classes",
            dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
@router.get(f"{VERSION}/config", summary="Model configuration of a stored version", openapi_extra=VERSION_PARAMETER,
            name="version_config", dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
async def model_config(active: Model, state: State) -> dict[str, Any]:
    """`max_batch_size` is the images one request may hold; each batch item is one encoded image (dims [1],
    reshaped to a scalar, so requests send shape [images]); `classnames` lists the classes in class order."""
    settings = state.settings
    return {
        "name": active.name, "platform": f"promptserve_{active.manifest.method}", "backend": "promptserve",
        "version_policy": {"specific": {"versions": [active.version]}},
        "max_batch_size": settings.max_images_per_request,
        "input": [{"name": INPUT, "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1],
                   "reshape": {"shape": []}}],
        "output": [{"name": "labels", "data_type": "TYPE_STRING", "dims": [-1]},
                   {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1]}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(settings.batch_max_wait_ms * 1000)},
        "parameters": {"classnames": {"string_value": json.dumps(list(active.manifest.classnames))},
                       "classes": {"string_value": str(len(active.manifest.classnames))}},
    }


@router.get("/models/{task}/ready", summary="Model readiness", responses=MODEL_ERRORS)
@router.get(f"{VERSION}/ready", summary="Model readiness of a stored version", openapi_extra=VERSION_PARAMETER,
            name="version_ready", responses=MODEL_ERRORS)
async def model_ready(active: Model) -> dict[str, Any]:
    return {"name": active.name, "ready": True, "version": str(active.version)}


@router.post("/repository/index", summary="The models (tasks) this server holds", dependencies=ClassifyAccess,
             responses=error_responses(*READ_ERRORS, *WITH_BODY, v2=True))
async def repository_index(state: State) -> list[dict[str, str]]:
    # a cold task is READY too: it answers its first request after a bounded activation
    versions = {name: state.tasks.active_version(name) for name in state.tasks.names()}
    return [{"name": name, "version": str(version), "state": "READY"} for name, version in versions.items()
            if version is not None]  # None: deleted meanwhile


INFER_ERRORS = error_responses(*CLASSIFY_ERRORS, 429, v2=True)
# The JSON form of the body (the binary extension appends raw tensor data after it); read by hand, not by FastAPI
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object", "properties": {"top_k": {"type": "integer",
                                                                                            "minimum": 1}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"], "properties": {
                "name": {"const": INPUT}, "datatype": {"const": "BYTES"},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                "data": {"type": "array", "items": {"type": "string", "description": "an image file's base64"}},
                "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
            "name": {"enum": list(OUTPUTS)}, "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"},
                "classification": {"type": "integer", "minimum": 1,
                                   "description": "answer 'score:index:label' strings, best k first"}}}}}}}}}}}}


@router.post("/models/{task}/infer", dependencies=ClassifyAccess, summary="Classify a BYTES tensor of images",
             responses=INFER_ERRORS, openapi_extra=INFER_BODY)
@router.post(f"{VERSION}/infer", dependencies=ClassifyAccess, openapi_extra=VERSION_PARAMETER | INFER_BODY,
             summary="Classify a BYTES tensor of images with the active version", name="version_infer",
             responses=INFER_ERRORS)
async def infer(active: Model, request: Request, state: State) -> Response:
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise ServiceError(415, "unsupported_encoding", "send the request body uncompressed")
    infer_request, uploads = _read_infer(await read_body(request), request.headers.get(HEADER_LENGTH), state)
    requested = _requested(infer_request)
    classes = len(active.manifest.classnames)
    top_k = _top_k(infer_request.parameters, classes, requested)
    note_versions([(active.name, active.version)])
    answer_k = max(classes if r.class_order else min(r.classification or top_k, classes) for r in requested)
    (probabilities,) = await state.pipeline.classify(uploads, (active,), answer_k)
    header, binary_parts = await anyio.to_thread.run_sync(_outputs, active, probabilities, top_k, requested)
    header = {"model_name": active.name, "model_version": str(active.version), **header}
    if infer_request.id is not None:
        header["id"] = infer_request.id
    encoded = json.dumps(header).encode()
    if not binary_parts:
        return Response(encoded, media_type="application/json")
    return Response(encoded + b"".join(binary_parts), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(encoded))})


def _read_infer(body: bytearray, header_length: str | None, state: AppState) -> tuple[InferRequest, Uploads]:
    """The request and its images; nothing but the images outlives this call (the body is the caller's
    temporary, the views into it end here)."""
    max_images = state.settings.max_images_per_request
    if header_length is None:  # all JSON: the parser takes (and empties) the whole body
        infer_request = _parse(body, max_images)
        return infer_request, _images(infer_request, memoryview(b""), state)
    if not _LENGTH.fullmatch(header_length) or int(header_length) > len(body):
        raise ServiceError(422, "bad_header_length",
                           f"{HEADER_LENGTH} must be the JSON header's length in bytes, at most {len(body)}")
    view = memoryview(body)
    infer_request = _parse(bytearray(view[: int(header_length)]), max_images)
    return infer_request, _images(infer_request, view[int(header_length) :], state)


def v2_json_values(images: int) -> int:
    """Values a V2 JSON header may hold: the envelope, parameters and outputs a client like tritonclient sends,
    and one string per image when the tensor travels as JSON."""
    return 256 + 2 * images


def _parse(header: bytearray, max_images: int) -> InferRequest:
    document = parse_json(header, max_values=v2_json_values(max_images))
    try:
        return InferRequest.model_validate(document)
    except ValidationError as exc:
        detail = summarize_errors(exc.errors(include_url=False, include_input=False))
        raise ServiceError(422, "bad_infer_request", f"not a V2 inference request: {detail}") from exc


def _images(infer_request: InferRequest, binary: memoryview, state: AppState) -> Uploads:
    tensor = _the_input(infer_request.inputs)
    count = math.prod(tensor.shape)
    if count < 1 or min(tensor.shape, default=1) < 0:
        raise ServiceError(422, "no_images", f"input '{INPUT}' has shape {tensor.shape}: send at least one image")
    check_image_count(count, state.settings)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
            raise ServiceError(422, "bad_binary_data", f"binary_data_size is {size!r} but {len(binary)} bytes "
                               "follow the JSON header")
        elements = _unpack_bytes(binary, state.settings.max_image_bytes, count)
    elif binary:
        raise ServiceError(422, "bad_binary_data", f"{len(binary)} bytes follow the JSON header but no input "
                           "declares binary_data_size")
    else:
        elements = _json_elements(tensor, count, state.settings.max_image_bytes)
    if len(elements) != count:
        raise ServiceError(422, "bad_shape", f"input '{INPUT}' has shape {tensor.shape} but {len(elements)} elements")
    return [(f"image{i}", data) for i, data in enumerate(elements)]


def _the_input(inputs: list[InputTensor]) -> InputTensor:
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].datatype != "BYTES":
        given = ", ".join(f"{t.name} ({t.datatype})" for t in inputs[:4]) or "none"
        raise ServiceError(422, "bad_input", f"send exactly one input, '{INPUT}' of datatype BYTES (got {given}"
                           f"{' and more' if len(inputs) > 4 else ''})")
    return inputs[0]


def _unpack_bytes(binary: memoryview, max_bytes: int, count: int) -> list[bytes]:
    """The elements of a BYTES tensor in binary form: each bounded before it is copied, and no more than the
    shape's `count` of them (a million empty elements stop at count + 1)."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(binary):
        if len(elements) == count:
            raise ServiceError(422, "bad_shape", f"input '{INPUT}' holds more than the {count} elements its shape "
                               "declares")
        if offset + LENGTH_PREFIX.size > len(binary):
            raise ServiceError(422, "bad_binary_data", "BYTES data ends inside an element's 4-byte length")
        (length,) = LENGTH_PREFIX.unpack_from(binary, offset)
        offset += LENGTH_PREFIX.size
        if length > max_bytes:
            raise ServiceError(413, "image_too_large", f"an image of {length} bytes exceeds the {max_bytes}-byte limit")
        if offset + length > len(binary):
            raise ServiceError(422, "bad_binary_data", "BYTES data ends inside an element")
        elements.append(bytes(binary[offset : offset + length]))
        offset += length
    return elements


def _json_elements(tensor: InputTensor, count: int, max_bytes: int) -> list[bytes]:
    data = tensor.data
    if data is None:
        raise ServiceError(422, "no_images", f"input '{INPUT}' has neither 'data' nor binary_data_size")
    if len(data) != count:
        raise ServiceError(422, "bad_shape", f"input '{INPUT}' has shape {tensor.shape} but {len(data)} elements")
    if not all(isinstance(item, str) for item in data):
        raise ServiceError(422, "bad_input", f"input '{INPUT}' data must be a flat list of base64 strings")
    elements = []
    for i in range(len(data)):  # each string dropped once decoded
        item, data[i] = data[i], None
        elements.append(decode_base64_image(item, max_bytes=max_bytes, filename=f"{INPUT}[{i}]"))
    return elements


def _top_k(parameters: dict[str, Any], classes: int, requested: list[Requested]) -> int:
    top_k = parameters.get("top_k", classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ServiceError(422, "bad_top_k", f"parameter top_k must be a positive integer, not {top_k!r}")
    if "top_k" in parameters and all(r.class_order or r.classification for r in requested):
        raise ServiceError(422, "bad_top_k", "top_k sorts the 'labels' output, which this request does not ask for: "
                           "'probabilities' alone answers every class in class order (labels in /config), and "
                           "an output's 'classification' parameter sets its own k")
    return min(top_k, classes)  # a k beyond the classes answers every class


@dataclass(frozen=True)
class Requested:
    """An output a request asks for: in binary form or not, in class order (probabilities alone) or as Triton's
    classification strings (its best `classification` classes)."""

    name: str
    binary: bool
    class_order: bool = False
    classification: int | None = None


def _requested(infer_request: InferRequest) -> list[Requested]:
    """Each output the request asked for (both, best first, when it names none)."""
    if infer_request.outputs is None:
        return [Requested(name, infer_request.parameters.get("binary_data_output") is True) for name in OUTPUTS]
    unknown = [o.name for o in infer_request.outputs if o.name not in OUTPUTS]
    if unknown:
        raise ServiceError(422, "unknown_output", f"unknown outputs {unknown}: this model has {list(OUTPUTS)}")
    alone = [o.name for o in infer_request.outputs] == ["probabilities"]
    return [Requested(o.name, o.parameters.get("binary_data") is True, alone, _classification(o))
            for o in infer_request.outputs]


def _classification(output: RequestedOutput) -> int | None:
    k = output.parameters.get("classification")
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ServiceError(422, "bad_classification", f"output '{output.name}': classification must be a positive "
                           f"integer, not {k!r}")
    if output.name != "probabilities":
        raise ServiceError(422, "bad_classification", "classification applies to the 'probabilities' output")
    return k


def _outputs(task: ActiveTask, probabilities: torch.Tensor, top_k: int,
             requested: list[Requested]) -> tuple[dict, list[bytes]]:
    """The response's `outputs` and the binary data that follows the header, in output order."""
    outputs, binary = [], []
    for output in requested:
        datatype, shape, data = _tensor(task, probabilities, top_k, output)
        raw = (b"".join(LENGTH_PREFIX.pack(len(b)) + b for b in map(str.encode, data)) if datatype == "BYTES"
               else np.asarray(data, "<f4").tobytes())
        entry: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": shape}
        if output.binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = data
        outputs.append(entry)
    return {"outputs": outputs}, binary


def _tensor(task: ActiveTask, probabilities: torch.Tensor, top_k: int,
            output: Requested) -> tuple[str, list[int], list[Any]]:
    """(datatype, shape, flat data) of one output, [images, k] best first, or [images, classes] in class order."""
    if output.class_order and not output.classification:
        return "FP32", list(probabilities.shape), probabilities.flatten().tolist()
    top = probabilities.topk(min(output.classification or top_k, probabilities.shape[1]), dim=-1)
    shape, names = list(top.indices.shape), task.manifest.classnames
    values, indices = top.values.flatten().tolist(), top.indices.flatten().tolist()
    if output.classification:  # Triton's format: the score as C's %f, the class index, the label
        return "BYTES", shape, [f"{p:f}:{i}:{names[i]}" for p, i in zip(values, indices, strict=True)]
    if output.name == "labels":
        return "BYTES", shape, [names[i] for i in indices]
    return "FP32", shape, values
