"""Decoding untrusted image bytes, with limits checked before any pixel is decompressed."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from service.errors import ServiceError


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, filename: str = "image") -> Image.Image:
    """An RGB image, or a ServiceError: 413 too large, 415 not an image, 422 corrupt."""
    if len(data) > max_bytes:
        raise ServiceError(413, "image_too_large", f"{filename}: {len(data)} bytes exceed the {max_bytes}-byte limit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ServiceError(413, "image_too_many_pixels", f"{filename}: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ServiceError(415, "not_an_image", f"{filename}: not an image format this service decodes") from exc
        width, height = image.size
        if width * height > max_pixels:
            raise ServiceError(
                413, "image_too_many_pixels", f"{filename}: {width}x{height} exceeds the {max_pixels}-pixel limit"
            )
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ServiceError(422, "corrupt_image", f"{filename}: image data is corrupt or truncated ({exc})") from exc
