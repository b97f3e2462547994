"""Decoding untrusted image bytes, with limits checked before any pixel is decompressed."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
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
