import json
import math
import pickle
import struct

import pytest
import torch

from service.bundle.codec import decode_bundle, encode_bundle, read_bundle, write_bundle
from service.bundle.manifest import FORMAT_VERSION, Manifest
from service.core.bitpack import pack_indices, packed_size, unpack_indices
from service.core.records import BackboneRef, PromptLayout
from service.methods import BundleError, Kind
from tests.helpers import CLASSES, REF, expect_field, manifest, raw_manifest, with_manifest


def qprompt_tensors(bits: int, count: int = 4 * 512, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 2**bits, (count,), generator=g)
    return {
        "indices": pack_indices(indices, bits),
        "codebook": torch.linspace(-1.5, 1.5, 2**bits).half(),
        "mu": torch.tensor([0.01]),
        "sigma": torch.tensor([0.2]),
    }


def test_coop_bundle_round_trips_with_manifest_and_context(tmp_path):
    ctx = torch.randn(4, 512)
    path = tmp_path / "coop.bundle"
    size = write_bundle(path, manifest(metrics={"base_acc": 0.8}), {"ctx": ctx})
    bundle = read_bundle(path)
    assert size == path.stat().st_size
    assert bundle.manifest.classnames == CLASSES
    assert bundle.manifest.backbone == REF
    assert bundle.manifest.metrics == {"base_acc": 0.8}
    assert torch.equal(bundle.class_prompt().ctx, ctx)
    assert not list(tmp_path.glob("*.tmp"))


def test_zeroshot_bundle_has_no_tensors_and_keeps_templates():
    data = encode_bundle(manifest("zeroshot", prompt=PromptLayout(), options={"templates": ["a {}."]}), {})
    bundle = decode_bundle(data)
    assert bundle.class_prompt() is None and bundle.payload_bytes == 0
    assert bundle.manifest.options["templates"] == ["a {}."]


def test_class_specific_context_round_trips():
    layout = PromptLayout(n_ctx=2, ctx_dim=8, class_specific=True)
    ctx = torch.randn(len(CLASSES), 2, 8)
    assert torch.equal(decode_bundle(encode_bundle(manifest(prompt=layout), {"ctx": ctx})).class_prompt().ctx, ctx)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qprompt_dequantizes_to_sigma_times_codebook_plus_mu(bits):
    tensors = qprompt_tensors(bits)
    bundle = decode_bundle(encode_bundle(manifest("qprompt", options={"bits": bits}), tensors))
    indices = unpack_indices(tensors["indices"], bits, 4 * 512)
    expected = (0.2 * tensors["codebook"].float()[indices] + 0.01).reshape(4, 512)
    assert torch.allclose(bundle.class_prompt().ctx, expected)
    assert bundle.class_prompt().ctx.unique().numel() <= 2**bits


def test_one_bit_4x512_qprompt_payload_is_at_most_300_bytes():
    bundle = decode_bundle(encode_bundle(manifest("qprompt", options={"bits": 1}), qprompt_tensors(1)))
    assert bundle.payload_bytes <= 300
    assert bundle.tensors["indices"].numel() == 256


@pytest.mark.parametrize("bits", range(1, 9))
def test_bitpack_round_trips_and_is_dense(bits):
    values = torch.randint(0, 2**bits, (1001,))
    packed = pack_indices(values, bits)
    assert packed.numel() == math.ceil(bits * 1001 / 8) == packed_size(bits, 1001)
    assert torch.equal(unpack_indices(packed, bits, 1001), values)


def test_bitpack_refuses_out_of_range_indices():
    with pytest.raises(ValueError, match="indices must lie"):
        pack_indices(torch.tensor([0, 4]), 2)


# --- hostile and malformed bundles: each error names its field -------------------------------------


def good_coop() -> bytes:
    return encode_bundle(manifest(), {"ctx": torch.zeros(4, 512)})


def test_pickle_file_is_refused_without_unpickling():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    expect_field(pickle.dumps({"ctx": Boom()}), "file")
    expect_field(b"", "file")
    expect_field(struct.pack("<Q", 10**12) + b"{}", "file")
    expect_field(struct.pack("<Q", 4) + b"\xff\xfe{}", "file")


def test_truncated_tensor_data_is_refused():
    data = good_coop()
    expect_field(data[:-100], "tensors")


def test_missing_manifest_is_refused():
    import safetensors.torch

    expect_field(safetensors.torch.save({"ctx": torch.zeros(4, 512)}), "manifest")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"format": "other"}, "format"),
        ({"format_version": FORMAT_VERSION + 1}, "format_version"),
        ({"method": "lora"}, "method"),
        ({"classnames": []}, "classnames"),
        ({"classnames": ["a", "a"]}, "classnames"),
        ({"classnames": ["a", 3]}, "classnames"),
        ({"backbone": {"model": "ViT-B-16", "pretrained": None}}, "backbone.fingerprint"),
        ({"backbone": {"model": "", "fingerprint": "x"}}, "backbone.model"),
        ({"prompt": {"n_ctx": 0, "ctx_dim": 512}}, "prompt.n_ctx"),
        ({"prompt": {"n_ctx": 4, "ctx_dim": 512, "class_token_position": "left"}}, "prompt.class_token_position"),
        ({"prompt": {"n_ctx": -1, "ctx_dim": 512}}, "prompt.n_ctx"),
        ({"options": []}, "options"),
    ],
)
def test_bad_manifest_fields_are_named(changes, field):
    expect_field(with_manifest(raw_manifest(**changes)), field)


@pytest.mark.parametrize(
    ("tensors", "field"),
    [
        ({}, "ctx"),
        ({"ctx": torch.zeros(4, 256)}, "ctx"),
        ({"ctx": torch.zeros(4, 512, dtype=torch.int32)}, "ctx"),
        ({"ctx": torch.zeros(4, 512), "extra": torch.zeros(1)}, "extra"),
        ({"ctx": torch.full((4, 512), float("nan"))}, "ctx"),
        ({"ctx": torch.full((4, 512), float("inf"))}, "ctx"),
    ],
)
def test_bad_tensors_are_named(tensors, field):
    expect_field(with_manifest(raw_manifest(), tensors), field)


def test_qprompt_bits_and_sigma_are_checked():
    raw = raw_manifest(method="qprompt", options={"bits": 9})
    expect_field(with_manifest(raw, qprompt_tensors(1)), "options.bits")
    tensors = qprompt_tensors(2) | {"sigma": torch.tensor([0.0])}
    expect_field(with_manifest(raw_manifest(method="qprompt", options={"bits": 2}), tensors), "sigma")
    wrong_size = qprompt_tensors(2) | {"indices": torch.zeros(10, dtype=torch.uint8)}
    expect_field(with_manifest(raw_manifest(method="qprompt", options={"bits": 2}), wrong_size), "indices")


def test_encode_refuses_to_write_an_invalid_bundle(tmp_path):
    with pytest.raises(BundleError):
        write_bundle(tmp_path / "x.bundle", manifest(), {"ctx": torch.zeros(3, 512)})
    assert not list(tmp_path.iterdir())


# --- MaPLe / QMaPLe (vision-side) ---------------------------------------------------------------------

IMAGE_REF = BackboneRef("ViT-B-16", "openai", "sha256:" + "ab" * 32, "sha256:" + "cd" * 32)
MAPLE_LAYOUT = PromptLayout(n_ctx=2, ctx_dim=512)
MAPLE_OPTIONS = {"depth": 9, "vision_width": 768, "fixed_text": "of a"}


def maple_manifest(method: str = "maple", backbone: BackboneRef = IMAGE_REF, **options) -> Manifest:
    return Manifest(method=method, backbone=backbone, classnames=CLASSES, prompt=MAPLE_LAYOUT,
                    options=MAPLE_OPTIONS | options)


def maple_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"text_prompts": torch.randn(9, 2, 512, generator=g).half(),
            "vision_prompts": torch.randn(9, 2, 768, generator=g).half()}


def test_maple_bundle_for_vit_b16_is_46080_payload_bytes_and_splits_its_prompts():
    tensors = maple_tensors()
    bundle = decode_bundle(encode_bundle(maple_manifest(), tensors))
    assert bundle.payload_bytes == 46_080 and bundle.spec.kind is Kind.VISION
    assert torch.equal(bundle.class_prompt().ctx, tensors["text_prompts"][0].float())
    assert torch.equal(bundle.class_prompt().deep, tensors["text_prompts"][1:].float())
    assert torch.equal(bundle.vision_prompts(), tensors["vision_prompts"].float())
    assert bundle.manifest.backbone.image_fingerprint == IMAGE_REF.image_fingerprint


def test_text_side_bundles_have_no_vision_prompts_and_load_without_an_image_fingerprint():
    bundle = decode_bundle(good_coop())
    assert bundle.manifest.backbone.image_fingerprint is None
    assert bundle.vision_prompts() is None and bundle.class_prompt().deep is None and bundle.spec.kind is Kind.TEXT


def test_maple_bundle_without_image_fingerprint_is_refused_naming_it():
    raw = json.loads(maple_manifest(backbone=REF).to_json())
    expect_field(with_manifest(raw, maple_tensors()), "backbone.image_fingerprint")


@pytest.mark.parametrize(("options", "field"), [
    ({"depth": 0}, "options.depth"), ({"depth": 65}, "options.depth"), ({"depth": "9"}, "options.depth"),
    ({"vision_width": 0}, "options.vision_width"), ({"fixed_text": 3}, "options.fixed_text"),
])
def test_bad_maple_options_are_named(options, field):
    raw = json.loads(maple_manifest(**options).to_json())
    expect_field(with_manifest(raw, maple_tensors()), field)


def test_maple_prompts_of_the_wrong_depth_are_refused_naming_the_tensor():
    raw = json.loads(maple_manifest(depth=8).to_json())
    expect_field(with_manifest(raw, maple_tensors()), "text_prompts")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_qmaple_dequantizes_each_depth_row_with_its_own_codebook(bits):
    g = torch.Generator().manual_seed(bits)
    indices = torch.randint(0, 2**bits, (9, 2 * 512), generator=g)
    codebook = torch.randn(9, 2**bits, generator=g).half()
    mu, sigma = torch.randn(9, generator=g), torch.rand(9, generator=g) + 0.1
    tensors = {"indices": pack_indices(indices, bits), "codebook": codebook, "mu": mu, "sigma": sigma,
               "vision_prompts": torch.zeros(9, 2, 768).half()}
    bundle = decode_bundle(encode_bundle(maple_manifest("qmaple", bits=bits), tensors))
    expected = torch.stack([sigma[j] * codebook[j].float()[indices[j]] + mu[j] for j in range(9)]).reshape(9, 2, 512)
    prompt = bundle.class_prompt()
    assert torch.equal(torch.cat([prompt.ctx[None], prompt.deep]), expected)
    assert bundle.payload_bytes == math.ceil(9 * 2 * 512 * bits / 8) + 9 * 2**bits * 2 + 72 + 9 * 2 * 768 * 2
