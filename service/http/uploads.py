"""Request bodies that carry images: multipart files or JSON with base64 (or data-URI) strings.

Both become `[(filename, bytes)]` under the same limits (image count, bytes per image) and the same error
codes, so the routes after them never see which form a client used. A route may take text fields beside the
images (`read_image_form`: zero-shot labels), as repeated multipart fields or JSON lists of strings.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.config import Settings
from service.serving.errors import ServiceError
from service.serving.pipeline import Uploads

JSON_IMAGES_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["images"], "additionalProperties": False,
    "properties": {"images": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["data"], "additionalProperties": False,
        "properties": {"name": {"type": "string"},
                       "data": {"type": "string", "description": "base64, or a data URI (data:image/png;base64,...)"}},
    }}},
}


TextFields = dict[str, list[str]]


async def read_image_uploads(request: Request, settings: Settings) -> Uploads:
    """The images of a classify request, sent as multipart/form-data (field 'images') or application/json."""
    return (await read_image_form(request, settings, {}))[0]


async def read_image_form(request: Request, settings: Settings,
                          fields: Mapping[str, int]) -> tuple[Uploads, TextFields]:
    """The images, and each text field in `fields` as a list of strings (name → most values a multipart body may
    hold, which bounds its parser; a JSON body is parsed whole already)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, settings, fields)
    if content_type == "application/json":
        return _read_json(await request.body(), settings, fields)
    raise ServiceError(415, "bad_content_type", "send images as multipart/form-data in the field 'images', or as "
                       'application/json {"images": [{"name": ..., "data": <base64>}]}')


async def _read_multipart(request: Request, settings: Settings,
                          fields: Mapping[str, int]) -> tuple[Uploads, TextFields]:
    try:
        form = await request.form(max_files=settings.max_images_per_request, max_fields=16 + sum(fields.values()),
                                  max_part_size=settings.max_image_bytes)
    except HTTPException as exc:  # Starlette reports multipart limits and syntax errors as 400s
        if "Too many files" in str(exc.detail):
            raise _too_many(settings) from exc
        raise ServiceError(422, "bad_multipart", f"the multipart body could not be parsed: {exc.detail}") from exc
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ServiceError(422, "no_images", "no image files in the request: use the multipart field 'images'")
        texts = {name: [v for v in form.getlist(name) if isinstance(v, str)] for name in fields}
        return [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)], texts
    finally:
        await form.close()


def _read_json(body: bytes, settings: Settings, fields: Mapping[str, int]) -> tuple[Uploads, TextFields]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(422, "bad_json", f"the body is not valid JSON: {exc}") from exc
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise ServiceError(422, "no_images", 'the JSON body needs "images": a non-empty list of '
                           '{"name": ..., "data": <base64>}')
    check_image_count(len(images), settings)
    texts = {name: _json_strings(document, name) for name in fields}
    return [_json_image(i, item, settings.max_image_bytes) for i, item in enumerate(images)], texts


def _json_strings(document: dict[str, Any], name: str) -> list[str]:
    values = document.get(name, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ServiceError(422, "bad_text_field", f'"{name}" must be a list of strings', field=f"body.{name}")
    return values


def _json_image(index: int, item: Any, max_bytes: int) -> tuple[str, bytes]:
    field = f"images[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("data"), str):
        raise ServiceError(422, "bad_image_field", f'{field} must be an object with a string "data"')
    name = item.get("name", f"image{index}")
    if not isinstance(name, str):
        raise ServiceError(422, "bad_image_field", f"{field}.name must be a string")
    return name, decode_base64_image(item["data"], max_bytes=max_bytes, filename=name)


def decode_base64_image(text: str, *, max_bytes: int, filename: str) -> bytes:
    """The bytes of a base64 string or data URI; its length is checked before anything is decoded."""
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ServiceError(422, "bad_base64", f"{filename}: a data URI must be 'data:<type>;base64,<data>'")
    if len(text) > 4 * -(-max_bytes // 3):  # the longest base64 of max_bytes bytes
        raise ServiceError(413, "image_too_large",
                           f"{filename}: {len(text)} base64 characters exceed the {max_bytes}-byte limit")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(422, "bad_base64", f"{filename}: not valid base64 ({exc})") from exc


def check_image_count(count: int, settings: Settings) -> None:
    if count > settings.max_images_per_request:
        raise _too_many(settings)


def _too_many(settings: Settings) -> ServiceError:
    return ServiceError(413, "too_many_images", f"at most {settings.max_images_per_request} images a request")
