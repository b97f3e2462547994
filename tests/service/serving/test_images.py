import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.serving.errors import ServiceError
from service.serving.images import DecodeLimits, ImagePreprocessor, decode_image, decode_images


@pytest.mark.parametrize("size", [(40, 40), (90, 31), (17, 64)])
def test_numpy_preprocessing_equals_open_clips_transform(backbone, size):
    generator = torch.Generator().manual_seed(sum(size))
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    images = [Image.fromarray(pixels), Image.fromarray(pixels).convert("L")]
    preprocessor = ImagePreprocessor(backbone.preprocess)
    assert preprocessor.supported
    expected = torch.stack([backbone.preprocess(image) for image in images])
    assert torch.allclose(preprocessor.batch(images), expected, atol=1e-5)


def test_unknown_transforms_fall_back_to_the_original():
    preprocessor = ImagePreprocessor(lambda image: torch.zeros(3, 2, 2))
    assert not preprocessor.supported
    image = Image.new("RGB", (4, 4))
    assert preprocessor.batch([image, image]).shape == (2, 3, 2, 2)


# --- untrusted bytes ---------------------------------------------------------------------------------

FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
LIMITS = DecodeLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_request_pixels=1 << 21, max_aspect_ratio=20)


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_mutated_images_decode_or_raise_a_service_error_only(fmt):
    """The decoders' own errors (struct.error, IndexError, ...) never escape as anything but a 4xx."""
    data = _encoded(fmt)
    rng = np.random.default_rng(len(fmt))
    for _ in range(150):
        mutated = bytearray(data[: rng.integers(1, len(data) + 1)])
        for position in rng.integers(0, len(mutated), size=rng.integers(1, 8)):
            mutated[position] = int(rng.integers(0, 256))
        try:
            image = decode_images([("x", bytes(mutated))], LIMITS)[0]
            assert image.mode == "RGB"
        except ServiceError as exc:
            assert 400 <= exc.status < 500 and exc.code


def test_summed_pixels_are_checked_before_any_image_is_decoded():
    big = io.BytesIO()
    Image.new("L", (1000, 800)).save(big, format="PNG")
    with pytest.raises(ServiceError) as err:
        decode_images([(name, big.getvalue()) for name in "abc"], LIMITS)
    assert err.value.code == "request_too_many_pixels"


@pytest.mark.parametrize(("size", "ok"), [((400, 20), True), ((401, 20), False), ((20, 401), False)])
def test_aspect_ratio_is_bounded_both_ways(size, ok):
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    if ok:
        assert decode_image(buffer.getvalue(), max_bytes=1 << 20, max_pixels=1 << 20, max_aspect_ratio=20).size == size
    else:
        with pytest.raises(ServiceError, match="times longer"):
            decode_image(buffer.getvalue(), max_bytes=1 << 20, max_pixels=1 << 20, max_aspect_ratio=20)
