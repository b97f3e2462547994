import pytest
import torch

from service.core.backbone import BackboneSpec, load_backbone, resolve_device, text_tower_fingerprint


def test_fingerprint_is_stable_and_tracks_text_weights(backbone, other_backbone):
    again = load_backbone(BackboneSpec("test-micro", device="cpu", seed=0))
    assert again.fingerprint == backbone.fingerprint
    assert other_backbone.fingerprint != backbone.fingerprint


def test_fingerprint_ignores_the_image_tower_but_not_the_text_tower():
    model = load_backbone(BackboneSpec("test-micro", device="cpu", seed=0)).model
    before = text_tower_fingerprint(model)
    with torch.no_grad():
        next(model.visual.parameters()).add_(1.0)
        assert text_tower_fingerprint(model) == before
        model.token_embedding.weight[0, 0] += 1e-3
    assert text_tower_fingerprint(model) != before


def test_images_encode_to_unit_vectors(backbone):
    features = backbone.encode_images(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_model_name_is_reported():
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-model'"):
        load_backbone(BackboneSpec("no-such-model"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backbone_matches_cpu(backbone):
    gpu = load_backbone(BackboneSpec("test-micro", device="cuda", seed=0))
    pixels = torch.randn(2, 3, 32, 32)
    assert gpu.fingerprint == backbone.fingerprint
    assert torch.allclose(gpu.encode_images(pixels), backbone.encode_images(pixels), atol=1e-4)
