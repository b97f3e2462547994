
import pytest
import torch
from PIL import Image

from service.images import ImagePreprocessor


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
