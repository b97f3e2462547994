"""The shipped tiny world CLIP loads through open_clip and is better than chance (no training here)."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.world import FAMILIES, make_dataset
from trainer.world.tinyclip import ASSET_DIR, load_tiny_clip

pytestmark = pytest.mark.skipif(
    not (ASSET_DIR / "weights.safetensors").is_file(), reason="tiny CLIP weights not built"
)


def test_weights_small_and_configs_agree():
    assert (ASSET_DIR / "weights.safetensors").stat().st_size <= 25 * 1024 * 1024
    plain = json.loads((ASSET_DIR / "config.json").read_text())
    local = json.loads((ASSET_DIR / "open_clip_config.json").read_text())
    assert local["model_cfg"] == plain
    assert plain["text_cfg"]["vocab_size"] == 49408


def test_loads_both_ways_and_classifies_above_chance():
    import open_clip

    model, preprocess, tokenizer = load_tiny_clip()
    open_clip.add_model_config(ASSET_DIR / "config.json")
    other = open_clip.create_model("config", pretrained=str(ASSET_DIR / "weights.safetensors")).eval()
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    size = model.visual.image_size[0]
    with torch.no_grad():
        for family in ("colour", "shape"):
            data = make_dataset(family, 2, seed=4242, size=size)
            images = torch.stack([preprocess(img) for img, _ in data])
            labels = torch.tensor([label for _, label in data])
            text = model.encode_text(tokenizer([f"a photo of a {c}." for c in FAMILIES[family]]), normalize=True)
            pred = (model.encode_image(images, normalize=True) @ text.T).argmax(1)
            acc = (pred == labels).float().mean().item()
            assert acc > 2.0 / len(FAMILIES[family]), (family, acc)
