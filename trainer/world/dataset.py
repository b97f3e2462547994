"""Labelled datasets of world images for few-shot training and evaluation.

A family (``"shape"``, ``"colour"`` or ``"composite"``) names the attribute(s) that are the label; every
other attribute is drawn at random — unless ``confound=True``, which gives each class its own fixed
nuisances (colour or shape, size, position, texture): a spurious correlation a few-shot learner can latch
on to, for training splits whose test split is drawn without it. Builders are balanced (``n_per_class``
images per class) and deterministic in ``seed``; use different seeds for train and test splits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import caption
from .families import (
    CODED_FAMILIES,
    COLOURS,
    FAMILIES,
    FAMILY_ATTRIBUTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    family_classnames,
)
from .render import SampleSpec, render, sample_specs

log = logging.getLogger(__name__)


def family_specs(family: str, n_per_class: int, seed: int, confound: bool = False) -> list[tuple[SampleSpec, int]]:
    """``n_per_class`` specs per class of ``family`` (or of a coded family), class-major order, with labels."""
    family_classnames(family)  # refuses unknown families
    family = CODED_FAMILIES.get(family, family)  # a coded family draws exactly the images of the one it codes
    out: list[tuple[SampleSpec, int]] = []
    for label, name in enumerate(FAMILIES[family]):
        fixed = (class_nuisances(label) if confound else {}) | class_attributes(family, name)
        # one independent stream per (seed, class): adding classes never changes the others
        for spec in sample_specs(n_per_class, seed=_class_seed(seed, family, label), **fixed):
            out.append((spec, label))
    return out


def class_attributes(family: str, name: str) -> dict[str, str]:
    """The spec attributes a class fixes: ``{"shape": "star"}``, or colour and shape for "red star"."""
    return dict(zip(FAMILY_ATTRIBUTE[family].split(), name.split(maxsplit=1), strict=True))


def class_nuisances(label: int) -> dict[str, str]:
    """Fixed nuisances of class ``label`` under confounding; steps coprime with 16 keep classes distinct."""
    return {
        "colour": list(COLOURS)[(3 * label) % len(COLOURS)],
        "shape": SHAPES[(5 * label) % len(SHAPES)],
        "size": list(SIZES)[label % len(SIZES)],
        "position": list(POSITIONS)[label % len(POSITIONS)],
        "texture": TEXTURES[label % len(TEXTURES)],
    }


def _class_seed(seed: int, family: str, label: int) -> int:
    fam = sum(ord(c) * 131**i for i, c in enumerate(family)) % 1_000_003
    return (seed * 1_000_003 + fam) * 997 + label


def make_dataset(
    family: str, n_per_class: int, seed: int, style: str = "photo", size: int = 64
) -> list[tuple[Image.Image, int]]:
    """Rendered ``(image, label)`` pairs; labels index ``family_classnames(family)``."""
    return [(render(spec, style=style, size=size), label) for spec, label in family_specs(family, n_per_class, seed)]


def write_imagefolder(
    root: str | Path, family: str, n_per_class: int, seed: int, style: str = "photo", size: int = 64,
    descriptions: bool = False, confound: bool = False,
) -> dict[str, int]:
    """Write ``root/<classname>/<index>.png`` (an ImageFolder tree); returns images per class. With
    ``descriptions``, also ``root/descriptions.tsv``: each image's full caption (TGP-T's training text)."""
    root = Path(root)
    names = family_classnames(family)
    rows = _write_images(root, family, n_per_class, seed, style, size, confound)
    if descriptions:
        (root / "descriptions.tsv").write_text("".join(f"{rel}\t{text}\t{names[label]}\n" for rel, label, text in rows),
                                               encoding="utf-8")
    counts: dict[str, int] = {}
    for _, label, _ in rows:
        counts[names[label]] = counts.get(names[label], 0) + 1
    log.info("wrote %d images of family %s (%s) under %s", len(rows), family, style, root)
    return counts


def write_coop(
    root: str | Path, family: str, per_split: dict[str, int], style: str = "photo", size: int = 64,
    confound_train: bool = False,
) -> Path:
    """A CoOp-layout dataset (``split_zhou_<family>.json``, images under ``images/<split>/<class>/``, the training
    images' captions in ``descriptions.tsv``): ``per_split`` images per class for each split, each split drawn
    from its own seed (train 1, val 3, test 2); ``confound_train`` confounds the training split only."""
    root, names = Path(root), family_classnames(family)
    doc, captions = {}, []
    for split, count in per_split.items():
        seed = {"train": 1, "val": 3, "test": 2}[split]
        rows = _write_images(root / "images" / split, family, count, seed, style, size,
                             confound_train and split == "train")
        doc[split] = [[f"{split}/{rel}", label, names[label]] for rel, label, _ in rows]
        captions += [f"images/{split}/{rel}\t{text}\t{names[label]}\n" for rel, label, text in rows if split == "train"]
    (root / "descriptions.tsv").write_text("".join(captions), encoding="utf-8")
    (root / f"split_zhou_{family}.json").write_text(json.dumps(doc))
    return root


def _write_images(root: Path, family: str, n_per_class: int, seed: int, style: str, size: int,
                  confound: bool) -> list[tuple[str, int, str]]:
    """Render and save ``root/<class>/<index>.png``; (relative path, label, caption) per image."""
    names = family_classnames(family)
    rows = []
    for k, (spec, label) in enumerate(family_specs(family, n_per_class, seed, confound=confound)):
        (root / names[label]).mkdir(parents=True, exist_ok=True)
        render(spec, style=style, size=size).save(root / names[label] / f"{k:06d}.png")
        rows.append((f"{names[label]}/{k:06d}.png", label, caption(spec, style)))
    return rows


def render_pool(specs: list[SampleSpec], styles: list[str] | str = "photo", size: int = 64) -> np.ndarray:
    """Render specs into one uint8 array ``(N, size, size, 3)``; ``styles`` is one style or one per spec."""
    if isinstance(styles, str):
        styles = [styles] * len(specs)
    if len(styles) != len(specs):
        raise ValueError("need one style per spec")
    pool = np.empty((len(specs), size, size, 3), dtype=np.uint8)
    for i, (spec, style) in enumerate(zip(specs, styles, strict=True)):
        pool[i] = np.asarray(render(spec, style=style, size=size))
    return pool
