"""Reduced image precisions: the agreement check, the choice `auto` makes, and the fallback to fp32 when a bf16 or
int8 encoder does not give fp32's answers (a deliberately broken quantized model among them)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.config import Settings
from service.core import backbone as backbone_module
from service.core.backbone import BackboneSpec, load_backbone
from service.core.precision import (
    MIN_COSINE,
    MIN_TOP1_AGREEMENT,
    TIE_MARGIN,
    agreement,
    calibration_images,
    calibration_labels,
    fast_precisions,
)
from tests.helpers import ROOT, break_int8_model

TINY = dict(model="promptserve-tiny", pretrained="world-v1", device="cpu")


def tiny(tmp_path: Path, precision: str, backend: str = "auto"):
    return load_backbone(BackboneSpec(**TINY, image_backend=backend, image_precision=precision,
                                      onnx_cache_dir=str(tmp_path)))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_identical_features_agree_fully():
    features, classes = unit(torch.randn(20, 8)), unit(torch.randn(5, 8))
    measured = agreement(features, features, classes)
    assert measured.cosine_min == pytest.approx(1.0) and measured.top1 == 1.0 and measured.shortfall() is None


def test_a_changed_top1_fails_and_says_so():
    classes = torch.eye(4)
    reference = unit(torch.tensor([[1.0, 0.2, 0, 0]] * 10))  # label 0, decided by far more than TIE_MARGIN
    candidate = reference.clone()
    candidate[0] = unit(torch.tensor([0.2, 1.0, 0, 0]))
    measured = agreement(reference, candidate, classes)
    assert measured.decided == 10 and measured.top1_decided == pytest.approx(0.9)
    assert "top-1 agreement 90.0%" in measured.shortfall() and "cosine" in measured.shortfall()


def test_a_flipped_tie_is_not_a_changed_answer():
    classes = torch.eye(3)
    reference = unit(torch.tensor([[1.0, 1.0 - TIE_MARGIN / 2, 0]] * 4 + [[1.0, 0, 0]] * 96))
    candidate = reference.clone()
    candidate[:4] = unit(torch.tensor([1.0 - TIE_MARGIN / 2, 1.0, 0]))  # the runner-up wins the tied images
    measured = agreement(reference, candidate, classes)
    assert measured.top1 == pytest.approx(0.96) and measured.decided == 96 and measured.top1_decided == 1.0
    assert measured.cosine_min > MIN_COSINE and measured.shortfall() is None


def test_nan_features_fail_the_check():
    features = unit(torch.randn(4, 8))
    assert "cosine" in agreement(features, torch.full_like(features, math.nan), unit(torch.randn(3, 8))).shortfall()


@pytest.mark.parametrize(("flags", "expected"), [
    (set(), []), ({"avx2", "fma"}, []), ({"avx512_vnni"}, ["int8"]), ({"avx_vnni"}, ["int8"]),
    ({"avx512_bf16"}, ["bf16"]), ({"avx512_vnni", "avx512_bf16"}, ["int8", "bf16"]), ({"amx_int8", "amx_bf16"},
                                                                                        ["int8", "bf16"])])
def test_fast_precisions_follow_the_cpu_flags(flags, expected):
    assert fast_precisions(frozenset(flags)) == expected


def test_the_calibration_set_is_the_same_on_every_start():
    first, second = calibration_images(), calibration_images()
    assert len(first) == 100 and [a.tobytes() for a in first] == [b.tobytes() for b in second]
    assert len({image.tobytes() for image in first}) == 100
    assert len(calibration_labels()) == len(set(calibration_labels())) > 1


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_reduced_precision_serves_when_it_agrees_with_fp32(tmp_path, precision):
    reduced, fp32 = tiny(tmp_path, precision), tiny(tmp_path, "fp32")
    assert reduced.image_precision == precision and fp32.image_precision == "fp32"
    (trial,) = reduced.precision_choice.trials
    assert trial.serves and trial.agreement.top1_decided >= MIN_TOP1_AGREEMENT
    check = reduced.describe()["image_precision_check"]
    assert check["requested"] == precision and check["fallback"] is None
    pixels = torch.stack([reduced.preprocess(image) for image in calibration_images(16)])
    assert F.cosine_similarity(reduced.encode_images(pixels), fp32.encode_images(pixels)).min() > MIN_COSINE
    # MaPLe's and TGP-T's forwards stay fp32 whatever the plain one runs in
    assert torch.equal(reduced.encode_image_tokens(pixels).features, fp32.encode_image_tokens(pixels).features)


@pytest.mark.slow
def test_a_broken_quantized_model_falls_back_to_fp32(tmp_path):
    assert tiny(tmp_path, "int8").image_precision == "int8"  # quantized and cached
    (quantized,) = tmp_path.glob("*-int8*.onnx")
    break_int8_model(quantized)
    broken = tiny(tmp_path, "int8")
    assert broken.image_precision == "fp32" and broken.image_encoder.name == "onnx"
    (trial,) = broken.precision_choice.trials
    assert not trial.serves and trial.agreement.cosine_min < MIN_COSINE
    assert broken.describe()["image_precision_check"]["fallback"].startswith("int8 not used: cosine to fp32")
    pixels = torch.randn(3, 3, 48, 48)
    assert torch.allclose(broken.encode_images(pixels), tiny(tmp_path, "fp32").encode_images(pixels), atol=1e-6)


@pytest.mark.slow
def test_a_quantized_model_that_cannot_load_falls_back_to_fp32(tmp_path):
    tiny(tmp_path, "fp32")  # the fp32 export, cached
    (exported,) = tmp_path.glob("*.onnx")
    exported.with_name(exported.stem + "-int8.onnx").write_bytes(b"not an onnx model")
    exported.with_name(exported.stem + "-int8-7bit.onnx").write_bytes(b"not an onnx model")
    broken = tiny(tmp_path, "int8")
    assert broken.image_precision == "fp32"
    assert "could not run" in broken.precision_choice.trials[0].reason


@pytest.mark.slow
def test_auto_takes_the_first_fast_precision_that_agrees(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone_module, "cpu_flags", lambda: frozenset({"avx512_vnni", "avx512_bf16"}))
    assert tiny(tmp_path, "auto").image_precision == "int8"
    assert tiny(tmp_path, "auto", backend="torch").image_precision == "bf16"  # int8 runs on ONNX Runtime only
    (quantized,) = tmp_path.glob("*-int8.onnx")
    break_int8_model(quantized)
    fallback = tiny(tmp_path, "auto")
    assert fallback.image_precision == "bf16" and [t.serves for t in fallback.precision_choice.trials] == [False, True]
    assert fallback.precision_choice.fallback.endswith("serving bf16")


@pytest.mark.slow
def test_auto_keeps_fp32_without_fast_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone_module, "cpu_flags", lambda: frozenset({"avx2"}))
    plain = tiny(tmp_path, "auto")
    assert plain.image_precision == "fp32" and plain.precision_choice.trials == ()


@pytest.mark.parametrize(("backend", "precision", "message"), [
    ("onnx", "bf16", "bf16 image precision runs on the torch"),
    ("torch", "int8", "int8 image precision runs on the onnx"),
    ("auto", "fp8", "image precision 'fp8' is unknown")])
def test_impossible_precisions_are_refused(backend, precision, message):
    with pytest.raises(ValueError, match=message):
        load_backbone(BackboneSpec("test-micro", device="cpu", image_backend=backend, image_precision=precision))


def test_the_documented_thresholds_are_the_code_s():
    text = (ROOT / "docs" / "serving.md").read_text()
    for name, value in (("MIN_COSINE", MIN_COSINE), ("MIN_TOP1_AGREEMENT", MIN_TOP1_AGREEMENT),
                        ("TIE_MARGIN", TIE_MARGIN)):
        assert f"`{name}` = {value}" in text, name


def test_the_setting_defaults_to_auto_and_reaches_the_backbone():
    assert Settings().image_precision == "auto" and BackboneSpec("x").image_precision == "fp32"
    assert Settings(image_precision="int8").backbone_spec().image_precision == "int8"
    with pytest.raises(ValueError, match="image_precision"):
        Settings(image_precision="fp8")


@pytest.mark.slow
def test_the_tiny_clip_keeps_its_world_top1_within_half_a_point_at_every_precision(tmp_path):
    from bench.precision_world import MAX_POINTS_FROM_FP32, PRECISIONS, model_card_sets, world_top1

    top1, agree, _ = world_top1(model_card_sets(), str(tmp_path))
    assert len(top1) == 9 and min(t["fp32"] for t in top1.values()) > 0.85  # the model card's sets, really classified
    for name, by_precision in top1.items():
        for precision in PRECISIONS:
            assert abs(by_precision[precision] - by_precision["fp32"]) * 100 <= MAX_POINTS_FROM_FP32, (name, precision)
            assert agree[name][precision] >= 0.99, (name, precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_is_fp16_fp32_is_fp32_and_cpu_precisions_are_refused():
    def on_cuda(precision: str):
        return load_backbone(BackboneSpec("test-micro", device="cuda", image_precision=precision))

    assert on_cuda("auto").image_precision == "fp16" and on_cuda("fp32").image_precision == "fp32"
    with pytest.raises(ValueError, match="for CPU"):
        on_cuda("int8")
