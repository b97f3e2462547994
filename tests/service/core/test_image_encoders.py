import torch
import torch.nn.functional as F

from service.core.backbone import BackboneSpec, load_backbone


def test_onnx_runtime_matches_torch_and_caches_the_export(tmp_path, backbone):
    spec = BackboneSpec("test-micro", device="cpu", seed=0, image_backend="onnx", onnx_cache_dir=str(tmp_path))
    onnx = load_backbone(spec)
    exported = list(tmp_path.glob("*.onnx"))
    assert len(exported) == 1 and not list(tmp_path.glob("*.tmp"))
    pixels = torch.randn(5, 3, 32, 32)
    cosine = F.cosine_similarity(onnx.encode_images(pixels), backbone.encode_images(pixels), dim=-1)
    assert cosine.min() > 1 - 1e-4
    assert onnx.describe()["image_backend"] == "onnx"

    mtime = exported[0].stat().st_mtime_ns
    load_backbone(spec)
    assert exported[0].stat().st_mtime_ns == mtime, "a cached export should be reused, not redone"


def test_unknown_image_backend_is_refused():
    import pytest

    with pytest.raises(ValueError, match="image backend 'tpu'"):
        load_backbone(BackboneSpec("test-micro", device="cpu", image_backend="tpu"))


def test_the_default_backend_is_onnx_runtime_on_cpu(tmp_path):
    from service.config import Settings

    settings = Settings(model="test-micro", pretrained="", onnx_cache_dir=str(tmp_path), image_precision="fp32")
    assert load_backbone(settings.backbone_spec()).describe()["image_backend"] == "onnx"
