"""Open Inference Protocol (KServe V2) REST routes: every task is a model.

A task takes one BYTES input `images` (encoded image files) and answers `labels` (BYTES) and `probabilities`
(FP32), both [images, k], sorted by probability; the request parameter `top_k` sets k (default: every class).
Tensor data travels as JSON or, with Triton's binary tensor extension (what `tritonclient` sends by default),
as raw bytes after the JSON header, whose length is the `Inference-Header-Content-Length` header. In JSON,
a BYTES element is the image's base64 (JSON strings cannot carry raw image bytes).

Inference goes through the classify request path (same limits, same micro-batcher); errors keep the service's
codes and add the protocol's `error` field, which V2 clients read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from service import __version__
from service.http.deps import CLASSIFY_ERRORS, READ_ERRORS, AppState, ClassifyAccess, State, TaskName
from service.http.errors import WITH_BODY, error_body, error_responses, summarize_errors
from service.http.jsonbody import parse_json, read_body
from service.http.schemas import Prediction, top_predictions
from service.http.uploads import check_image_count, decode_base64_image
from service.registry.base import UnknownTask
from service.serving.activation import ActiveTask
from service.serving.errors import ServiceError
from service.serving.pipeline import Uploads

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
MODEL_ERRORS = error_responses(404, 422, v2=True)
GUARDED_MODEL_ERRORS = error_responses(*READ_ERRORS, 404, 422, v2=True)


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


@router.get("", summary="Server metadata", responses=error_responses(v2=True))
async def server_metadata() -> dict[str, Any]:
    return {"name": "promptserve", "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}


def active_task(task: TaskName, request: Request, state: State) -> ActiveTask:
    """The task's active version, which answers the whole request; a path's {version} must name it."""
    active = state.tasks.get(task)
    version = request.path_params.get("version")
    if version is not None and version != str(active.version):
        raise ServiceError(404, "unknown_version", f"task '{task}' serves version {active.version}, not {version}")
    return active


Model = Annotated[ActiveTask, Depends(active_task)]
VERSION = "/models/{task}/versions/{version}"  # each model route also answers under its active version
VERSION_PARAMETER = {"parameters": [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                                     "description": "the task's active version"}]}


@router.get("/models/{task}", summary="Model metadata: a task's input and outputs", dependencies=ClassifyAccess,
            responses=GUARDED_MODEL_ERRORS)
@router.get(VERSION, summary="Model metadata of the active version", openapi_extra=VERSION_PARAMETER,
            name="version_metadata", dependencies=ClassifyAccess, responses=GUARDED_MODEL_ERRORS)
async def model_metadata(active: Model) -> dict[str, Any]:
    return {
        "name": active.name, "versions": [str(active.version)], "platform": f"promptserve_{active.manifest.method}",
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {"classes": len(active.manifest.classnames)},
    }


@router.get("/models/{task}/ready", summary="Model readiness", responses=MODEL_ERRORS)
@router.get(f"{VERSION}/ready", summary="Model readiness of the active version", openapi_extra=VERSION_PARAMETER,
            name="version_ready", responses=MODEL_ERRORS)
async def model_ready(active: Model) -> dict[str, Any]:
    return {"name": active.name, "ready": True, "version": str(active.version)}


@router.post("/repository/index", summary="The models (tasks) this server holds", dependencies=ClassifyAccess,
             responses=error_responses(*READ_ERRORS, *WITH_BODY, v2=True))
async def repository_index(state: State) -> list[dict[str, str]]:
    return [{"name": t.name, "version": str(t.version), "state": "READY"} for t in state.tasks.all()]


INFER_ERRORS = error_responses(*CLASSIFY_ERRORS, v2=True)
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
            "name": {"enum": list(OUTPUTS)}, "parameters": {"type": "object"}}}}}}}}}}


@router.post("/models/{task}/infer", dependencies=ClassifyAccess, summary="Classify a BYTES tensor of images",
             responses=INFER_ERRORS, openapi_extra=INFER_BODY)
@router.post(f"{VERSION}/infer", dependencies=ClassifyAccess, openapi_extra=VERSION_PARAMETER | INFER_BODY,
             summary="Classify a BYTES tensor of images with the active version", name="version_infer",
             responses=INFER_ERRORS)
async def infer(active: Model, request: Request, state: State) -> Response:
    if request.headers.get("content-encoding", "identity").strip().lower() != "identity":
        raise ServiceError(415, "unsupported_encoding", "send the request body uncompressed")
    infer_request, uploads = _read_infer(await read_body(request), request.headers.get(HEADER_LENGTH), state)
    top_k = _top_k(infer_request.parameters, len(active.manifest.classnames))
    requested = _requested(infer_request)
    (probabilities,) = await state.pipeline.classify(uploads, (active,), top_k)
    header, binary_parts = _outputs(top_predictions(active, probabilities, top_k), requested)
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


def _top_k(parameters: dict[str, Any], classes: int) -> int:
    top_k = parameters.get("top_k", classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ServiceError(422, "bad_top_k", f"parameter top_k must be a positive integer, not {top_k!r}")
    return min(top_k, classes)


def _outputs(predictions: list[list[Prediction]], requested: list[tuple[str, bool]]) -> tuple[dict, list[bytes]]:
    """The response's `outputs` and the binary data that follows the header, in output order."""
    shape = [len(predictions), len(predictions[0])]
    labels = [p.label for row in predictions for p in row]
    probabilities = [p.probability for row in predictions for p in row]
    tensors = {"labels": ("BYTES", labels, b"".join(LENGTH_PREFIX.pack(len(b)) + b for b in map(str.encode, labels))),
               "probabilities": ("FP32", probabilities, np.asarray(probabilities, "<f4").tobytes())}
    outputs, binary = [], []
    for name, as_binary in requested:
        datatype, data, raw = tensors[name]
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if as_binary:
            output["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            output["data"] = data
        outputs.append(output)
    return {"outputs": outputs}, binary


def _requested(infer_request: InferRequest) -> list[tuple[str, bool]]:
    """(output name, in binary form) for each output the request asked for (all of them when it names none)."""
    if infer_request.outputs is None:
        return [(name, infer_request.parameters.get("binary_data_output") is True) for name in OUTPUTS]
    unknown = [o.name for o in infer_request.outputs if o.name not in OUTPUTS]
    if unknown:
        raise ServiceError(422, "unknown_output", f"unknown outputs {unknown}: this model has {list(OUTPUTS)}")
    return [(o.name, o.parameters.get("binary_data") is True) for o in infer_request.outputs]
