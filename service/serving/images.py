"""Decoding untrusted image bytes, with limits checked before any pixel is decompressed."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from service.serving.errors import ServiceError

# Formats with well-trodden decoders only: no EPS (it runs Ghostscript), no TIFF (many rarely used codecs).
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int  # per image
    max_request_pixels: int  # summed over a request
    max_aspect_ratio: float


def decode_images(uploads: list[tuple[str, bytes]], limits: DecodeLimits) -> list[Image.Image]:
    """Every upload as RGB, or a ServiceError; all sizes are checked from headers before any pixel is decoded."""
    opened = [open_image(data, limits, filename=name) for name, data in uploads]
    total = sum(image.width * image.height for image in opened)
    if total > limits.max_request_pixels:
        raise ServiceError(413, "request_too_many_pixels", f"the request's images hold {total} pixels together, "
                           f"more than the {limits.max_request_pixels} allowed")
    return [load_rgb(image, name) for image, (name, _) in zip(opened, uploads, strict=True)]


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, filename: str = "image",
                 max_aspect_ratio: float = math.inf) -> Image.Image:
    """An RGB image, or a ServiceError: 413 too large, 415 not an image, 422 corrupt."""
    limits = DecodeLimits(max_bytes, max_pixels, max_pixels, max_aspect_ratio)
    return load_rgb(open_image(data, limits, filename=filename), filename)


def open_image(data: bytes, limits: DecodeLimits, *, filename: str) -> Image.Image:
    """Parse the header only (PIL opens lazily) and check size and shape against the limits."""
    if len(data) > limits.max_bytes:
        raise ServiceError(413, "image_too_large", f"{filename}: {len(data)} bytes exceed the "
                           f"{limits.max_bytes}-byte limit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise ServiceError(413, "image_too_many_pixels", f"{filename}: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ServiceError(415, "not_an_image", f"{filename}: not an image in a format this service decodes "
                               f"({', '.join(FORMATS)})") from exc
        except Exception as exc:  # noqa: BLE001  # a decoder's header parser fails in many ways on hostile bytes
            raise _corrupt(filename, exc) from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ServiceError(422, "corrupt_image", f"{filename}: the image is {width}x{height}")
    if width * height > limits.max_pixels:
        raise ServiceError(413, "image_too_many_pixels",
                           f"{filename}: {width}x{height} exceeds the {limits.max_pixels}-pixel limit")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ServiceError(422, "bad_aspect_ratio", f"{filename}: {width}x{height} is more than "
                           f"{limits.max_aspect_ratio:g} times longer one way than the other")
    return image


def load_rgb(image: Image.Image, filename: str) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")  # no copy of what is RGB already
        except Exception as exc:  # noqa: BLE001  # truncated or malformed data: the decoder's own error types vary
            raise _corrupt(filename, exc) from exc


def _corrupt(filename: str, exc: Exception) -> ServiceError:
    return ServiceError(422, "corrupt_image", f"{filename}: image data is corrupt or truncated "
                        f"({type(exc).__name__}: {str(exc)[:200]})")


class ImagePreprocessor:
    """open_clip's eval transform, with its tensor steps done in NumPy.

    Request threads preprocess while the encoder thread runs torch; torch's own ToTensor/Normalize would
    start a second OpenMP team on the same cores and stall both. The geometric steps stay open_clip's
    (PIL); only the final conversion `(pixels / 255 - mean) / std` moves to NumPy, which gives the same
    numbers.
    """

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor]):
        steps = list(getattr(preprocess, "transforms", []))
        names = [type(step).__name__ for step in steps]
        self.fallback = preprocess
        self.supported = names[-2:] in (["MaybeToTensor", "Normalize"], ["ToTensor", "Normalize"])
        if self.supported:
            self.geometric = steps[:-2]
            normalize = steps[-1]
            self.mean = np.asarray(normalize.mean, dtype=np.float32).reshape(3, 1, 1)
            self.std = np.asarray(normalize.std, dtype=np.float32).reshape(3, 1, 1)

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        """A preprocessed batch [B, 3, H, W]."""
        if not self.supported:
            return torch.stack([self.fallback(image) for image in images])
        return torch.from_numpy(np.stack([self._pixels(image) for image in images]))

    def _pixels(self, image: Image.Image) -> np.ndarray:
        for step in self.geometric:
            image = step(image)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std
