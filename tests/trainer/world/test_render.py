"""Fast checks of the procedural world (renderer, captions, dataset builders)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.world import COLOURS, FAMILIES, SHAPES, SHIFT_STYLES, STYLES
from trainer.world.captions import caption, random_caption
from trainer.world.dataset import family_specs, make_dataset, render_pool, write_imagefolder
from trainer.world.families import COMPOSITE_COLOURS, COMPOSITE_SHAPES
from trainer.world.render import SampleSpec, render, sample_specs, shape_mask
from trainer.world.weaken import interpolate

SIZE = 48


def px(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_families_have_at_least_16_distinct_classes():
    assert set(FAMILIES) >= {"shape", "colour"}
    for names in FAMILIES.values():
        assert len(names) >= 16
        assert len(set(names)) == len(names)


def test_sample_specs_deterministic_by_seed():
    assert sample_specs(20, seed=3) == sample_specs(20, seed=3)
    assert sample_specs(20, seed=3) != sample_specs(20, seed=4)
    fixed = sample_specs(10, seed=1, shape="star")
    assert all(s.shape == "star" for s in fixed)


@pytest.mark.parametrize("style", STYLES)
def test_render_deterministic(style):
    spec = sample_specs(1, seed=7)[0]
    a, b = render(spec, style, SIZE), render(spec, style, SIZE)
    assert a.size == (SIZE, SIZE) and a.mode == "RGB"
    assert np.array_equal(px(a), px(b))
    other = SampleSpec(**{**spec.to_dict(), "seed": spec.seed + 1})
    assert not np.array_equal(px(a), px(render(other, style, SIZE)))


def test_every_shape_renders_and_masks_are_distinct():
    masks = {s: shape_mask(s, SIZE, 0.7 * SIZE, (SIZE / 2, SIZE / 2)) for s in SHAPES}
    for s, m in masks.items():
        assert 0.05 < m.mean() < 0.6, s  # visible, and not filling the canvas
    names = list(masks)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            diff = np.abs(masks[names[i]] - masks[names[j]]).mean()
            assert diff > 0.02, (names[i], names[j], diff)


def test_every_colour_renders_distinctly():
    means = {}
    for c in COLOURS:
        spec = SampleSpec("square", c, size="large", background="light", texture="plain", seed=0)
        img = px(render(spec, "photo", SIZE))
        means[c] = img[SIZE // 2 - 4 : SIZE // 2 + 4, SIZE // 2 - 4 : SIZE // 2 + 4].reshape(-1, 3).mean(0)
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert np.abs(means[names[i]] - means[names[j]]).max() > 30, (names[i], names[j])


def test_distinct_classes_give_distinct_images():
    base = SampleSpec("circle", "red", size="large", seed=5)
    a = px(render(base, "photo", SIZE))
    for change in ({"shape": "square"}, {"colour": "blue"}):
        b = px(render(SampleSpec(**{**base.to_dict(), **change}), "photo", SIZE))
        assert np.abs(a - b).mean() > 5, change


@pytest.mark.parametrize("style", SHIFT_STYLES)
def test_shifted_style_differs(style):
    spec = SampleSpec("star", "green", size="large", seed=11)
    a = px(render(spec, "photo", SIZE))
    b = px(render(spec, style, SIZE))
    assert np.abs(a - b).mean() > 5


def test_captions_mention_class():
    for spec in sample_specs(30, seed=2):
        text = caption(spec)
        assert spec.shape in text and spec.colour in text and text.startswith("a photo of a")
        assert caption(spec, detail="shape") == f"a photo of a {spec.shape}."
    rng = np.random.default_rng(0)
    for spec in sample_specs(200, seed=9):
        text, mentions = random_caption(spec, "photo", rng)
        words = text.rstrip(".").replace(",", "").split()
        assert ("shape" in mentions) == (spec.shape in words)
        assert ("colour" in mentions) == (spec.colour in words)
        assert mentions & {"shape", "colour"}


def test_family_dataset_balanced_and_labelled(tmp_path):
    pairs = family_specs("colour", 2, seed=0)
    assert len(pairs) == 2 * len(FAMILIES["colour"])
    assert all(FAMILIES["colour"][label] == spec.colour for spec, label in pairs)
    assert family_specs("colour", 2, seed=0) == pairs
    data = make_dataset("shape", 1, seed=1, style="outline", size=32)
    assert [label for _, label in data] == list(range(len(SHAPES)))
    assert data[0][0].size == (32, 32)
    counts = write_imagefolder(tmp_path / "shape", "shape", 1, seed=0, size=32)
    assert counts == {s: 1 for s in SHAPES}
    assert len(list((tmp_path / "shape").glob("*/*.png"))) == len(SHAPES)
    pool = render_pool([s for s, _ in pairs[:4]], "noisy", size=32)
    assert pool.shape == (4, 32, 32, 3) and pool.dtype == np.uint8


def test_composite_base_half_is_a_checkerboard_covering_every_colour_and_shape():
    names = FAMILIES["composite"]
    base, novel = names[: len(names) // 2], names[len(names) // 2 :]
    assert len(names) == 36 and len(set(names)) == 36
    for half in (base, novel):
        assert {n.split()[0] for n in half} == set(COMPOSITE_COLOURS)
        assert {n.split()[1] for n in half} == set(COMPOSITE_SHAPES)
    pairs = family_specs("composite", 1, seed=3)
    assert all(names[label] == f"{spec.colour} {spec.shape}" for spec, label in pairs)


def test_confounded_specs_fix_each_classes_nuisances_and_keep_its_label():
    confounded = family_specs("shape", 6, seed=3, confound=True)
    free = family_specs("shape", 6, seed=3)
    by_class = {}
    for spec, label in confounded:
        assert spec.shape == FAMILIES["shape"][label]
        by_class.setdefault(label, set()).add((spec.colour, spec.size, spec.position, spec.texture))
    assert all(len(v) == 1 for v in by_class.values())  # one fixed nuisance tuple per class
    assert len({next(iter(v))[0] for v in by_class.values()}) == len(FAMILIES["shape"])  # distinct colours
    assert len({(s.colour, s.size) for s, label in free if label == 0}) > 1  # unconfounded: drawn at random


def test_weak_checkpoint_interpolates_floats_and_keeps_the_logit_scale():
    pretrained = {"w": torch.ones(3), "logit_scale": torch.tensor(4.6), "ids": torch.arange(3)}
    random = {"w": torch.zeros(3), "logit_scale": torch.tensor(0.0), "ids": torch.zeros(3, dtype=torch.long)}
    mixed = interpolate(pretrained, random, alpha=0.3)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.7))
    assert mixed["logit_scale"] == pretrained["logit_scale"] and torch.equal(mixed["ids"], pretrained["ids"])
    with pytest.raises(ValueError, match="alpha"):
        interpolate(pretrained, random, alpha=1.5)
