"""Request bodies that carry images: multipart files or JSON with base64 (or data-URI) strings.

Both become `[(filename, bytes)]` under the same limits (image count, bytes per image) and the same error
codes, so the routes after them never see which form a client used. Counts are checked while parsing
(`service.http.jsonbody`, Starlette's multipart limits) and each base64 string is dropped once decoded, so a
body costs a small constant times its size whatever its shape (docs/serving.md, "Memory"). A route may take text
fields beside the images (`read_image_form`: zero-shot labels), as repeated multipart fields or JSON lists of
strings.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException

from service.config import Settings
from service.http.jsonbody import parse_json, read_body
from service.serving.errors import ServiceError
from service.serving.pipeline import Uploads

MAX_NAME_CHARS = 1024

JSON_IMAGES_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["images"], "additionalProperties": False,
    "properties": {"images": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["data"], "additionalProperties": False,
        "properties": {"name": {"type": "string"},
                       "data": {"type": "string", "description": "base64, or a data URI (data:image/png;base64,...)"}},
    }}},
}


def media_type(headers: Headers, default: str = "") -> str:
    """The Content-Type's media type, lower-cased: media types are case-insensitive (RFC 9110)."""
    return headers.get("content-type", default).split(";")[0].strip().lower()


TextFields = dict[str, list[str]]


async def read_image_uploads(request: Request, settings: Settings) -> Uploads:
    """The images of a classify request, sent as multipart/form-data (field 'images') or application/json."""
    return (await read_image_form(request, settings, {}))[0]


async def read_image_form(request: Request, settings: Settings,
                          fields: Mapping[str, int]) -> tuple[Uploads, TextFields]:
    """The images, and each text field in `fields` as a list of strings (name → most values a body may hold, which
    bounds its parser)."""
    content_type = media_type(request.headers)
    if content_type == "multipart/form-data":
        return await _read_multipart(request, settings, fields)
    if content_type == "application/json":
        return _read_json(await read_body(request), settings, fields)
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
        return [(checked_name(f.filename or f"image{i}", f"images[{i}]"), await f.read())
                for i, f in enumerate(files)], texts
    finally:
        await form.close()


def json_values_for(images: int) -> int:
    """Values a JSON body with `images` entries may hold: each entry's object, name and data, room for a few
    more fields, and the envelope."""
    return 16 + 8 * images


def _read_json(body: bytearray, settings: Settings, fields: Mapping[str, int]) -> tuple[Uploads, TextFields]:
    document = parse_json(body, max_values=json_values_for(settings.max_images_per_request) + sum(fields.values()))
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list) or not images:
        raise ServiceError(422, "no_images", 'the JSON body needs "images": a non-empty list of '
                           '{"name": ..., "data": <base64>}')
    check_image_count(len(images), settings)
    texts = {name: _json_strings(document, name) for name in fields}
    uploads = []
    for i in range(len(images)):  # each base64 string dropped once decoded
        item, images[i] = images[i], None
        uploads.append(_json_image(i, item, settings.max_image_bytes))
    return uploads, texts


def _json_strings(document: dict[str, Any], name: str) -> list[str]:
    values = document.get(name, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ServiceError(422, "bad_text_field", f'"{name}" must be a list of strings', field=f"body.{name}")
    return values


def _json_image(index: int, item: Any, max_bytes: int) -> tuple[str, bytes]:
    field = f"images[{index}]"
    if not isinstance(item, dict) or not isinstance(item.get("data"), str):
        raise ServiceError(422, "bad_image_field", f'{field} must be an object with a string "data"')
    name = checked_name(item.get("name", f"image{index}"), field)
    return name, decode_base64_image(item.pop("data"), max_bytes=max_bytes, filename=name)


def checked_name(name: Any, field: str) -> str:
    """An image's name as the answer will echo it: a string of bounded length that UTF-8 can encode."""
    if isinstance(name, str) and len(name) <= MAX_NAME_CHARS:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    raise ServiceError(422, "bad_image_field", f"{field}.name must be a string of at most {MAX_NAME_CHARS} "
                       "characters, without lone surrogates")


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
