"""MaPLe and QMaPLe learners: prompt layout, depth clamp, training through both towers, and exports that
reproduce the learner exactly through the service's functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from service.bundle.codec import decode_bundle, encode_bundle
from service.bundle.compat import check_compatible
from service.core.vision_prompts import prompted_image_features
from service.serving.text_features import text_features
from trainer.cli import main
from trainer.methods import build_learner, make_config
from trainer.methods.quantizer import normalize
from trainer.world.dataset import write_imagefolder

CLASSES = ("red circle", "blue square", "green star")


def learner_for(backbone, method: str = "maple", **options):
    return build_learner(method, make_config(method, export_dtype="float32", **options), backbone, CLASSES)


def pixels_for(backbone, batch: int = 4, seed: int = 0) -> torch.Tensor:
    size = backbone.model.visual.image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def train_steps(learner, backbone, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        logits = learner(learner.image_features(pixels_for(backbone, seed=step)))
        loss = F.cross_entropy(logits, torch.arange(4) % len(CLASSES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.after_step()


def test_class_prompt_is_sot_two_ctx_of_a_class_period_eot(deep_backbone):
    learner = learner_for(deep_backbone)
    expected = deep_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])[:, : learner.tokens.ids.shape[1]]
    assert torch.equal(learner.tokens.ids[:, 1:3] != expected[:, 1:3], learner.tokens.ctx_mask[:, 1:3])
    assert torch.equal(learner.tokens.ids[:, 3:], expected[:, 3:]) and learner.tokens.ctx_mask[:, 1:3].all()
    words = torch.tensor(deep_backbone.tokenizer.encode("a photo"))
    assert torch.equal(learner.context(), deep_backbone.text.tower.token_embedding(words))
    assert learner.fixed_text == "of a"


def test_depth_is_clamped_to_the_shallower_tower_with_a_message(backbone, caplog):
    with caplog.at_level(logging.WARNING):
        learner = learner_for(backbone)  # test-micro: 1 image block, 2 text blocks
    assert learner.depth == 1 and "depth 9 exceeds" in caplog.text and "using depth 1" in caplog.text
    assert learner.export()[1]["vision_prompts"].shape == (1, 2, backbone.model.visual.transformer.width)


def test_deep_couplings_start_identical_and_the_shallow_one_differs(deep_backbone):
    couplings = learner_for(deep_backbone).couplings
    assert torch.equal(couplings[1].weight, couplings[2].weight)
    assert not torch.equal(couplings[0].weight, couplings[1].weight)


@pytest.mark.parametrize("tower", ["deep_backbone", "tiny_backbone"])
@pytest.mark.parametrize("method", ["maple", "qmaple"])
def test_learner_logits_equal_the_service_logits_of_the_exported_bundle(request, tower, method):
    backbone = request.getfixturevalue(tower)
    learner = learner_for(backbone, method)
    train_steps(learner, backbone)
    pixels = pixels_for(backbone, seed=9)
    with torch.no_grad():
        expected = learner(learner.image_features(pixels))
    bundle = decode_bundle(encode_bundle(*learner.export()))
    check_compatible(bundle, backbone)
    prompts = bundle.vision_prompts()
    with torch.no_grad():
        image = F.normalize(prompted_image_features(backbone.model.visual, pixels,
                                                    prompts.expand(len(pixels), *prompts.shape)), dim=-1)
    served = backbone.logit_scale * image @ text_features(bundle, backbone).T
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)


def test_training_moves_every_prompt_and_coupling(deep_backbone):
    learner = learner_for(deep_backbone)
    before = {name: p.detach().clone() for name, p in learner.named_parameters()}
    train_steps(learner, deep_backbone, steps=1)
    assert len(before) == 3 + 3 * 2
    assert all(not torch.equal(before[name], p) for name, p in learner.named_parameters()), "a parameter stayed"


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_qmaple_weights_lie_on_their_levels_and_the_bundle_dequantizes_to_training(deep_backbone, bits):
    learner = learner_for(deep_backbone, "qmaple", bits=bits, min_steps=1, kl_threshold=0.0)
    train_steps(learner, deep_backbone, steps=3)
    assert sum(q.clusterings for q, _ in learner.quantized_pairs()) > 0  # re-clustering did happen
    for quantizer, weight in learner.quantized_pairs():
        _, mu, sigma = normalize(weight)
        levels = sigma * quantizer.codebook + mu
        used = quantizer(weight).detach().reshape(-1, 1)
        assert len(quantizer.codebook) == 2**bits and (used == levels.reshape(1, -1)).any(dim=1).all()
    bundle = decode_bundle(encode_bundle(*learner.export()))
    with torch.no_grad():
        trained = learner.text_prompts()
    prompt = bundle.class_prompt()
    assert torch.equal(torch.cat([prompt.ctx[None], prompt.deep]), trained)
    assert learner.config.quantizer.bits == bundle.manifest.options["bits"] == bits


def test_qmaple_defaults_to_4_bits(deep_backbone):
    assert learner_for(deep_backbone, "qmaple").config.quantizer.bits == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maple", "qmaple"])
def test_cli_trains_a_maple_bundle_on_the_tiny_world_that_the_service_accepts(method, tiny_backbone, tmp_path: Path,
                                                                             capsys):
    data = tmp_path / "shapes"
    write_imagefolder(data / "train", "colour", 2, seed=1, style="faint", size=48)
    write_imagefolder(data / "test", "colour", 1, seed=2, style="faint", size=48)
    output = tmp_path / "maple.safetensors"
    code = main(["train", "--method", method, "--depth", "2", "--data", str(data), "--layout",
                 "imagefolder", "--protocol", "base2novel", "--shots", "2", "--epochs", "1", "--warmup-epochs", "0",
                 "--batch-size", "8", "--model", "promptserve-tiny", "--pretrained", "world-v1", "--device", "cpu",
                 "--no-progress", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    bundle = decode_bundle(output.read_bytes())
    assert bundle.manifest.method == method and bundle.manifest.options["depth"] == 2
    assert {"base", "novel", "hm"} <= set(bundle.manifest.metrics)
    check_compatible(bundle, tiny_backbone)
    capsys.readouterr()
    assert main(["inspect", str(output)]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_values"] == 2 * 2 * 128 + 2 * 2 * 128  # text + vision
