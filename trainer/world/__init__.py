"""A deterministic procedural image world (shapes x colours) with captions and labelled families.

Used to pretrain the tiny open_clip CLIP shipped as the service's embedded default, and as a
source of small labelled few-shot datasets (with domain-shifted styles) for tests.
"""

from .captions import caption, random_caption
from .dataset import family_specs, make_dataset, render_pool, write_imagefolder
from .families import (
    BACKGROUNDS,
    CODED_FAMILIES,
    COLOURS,
    FAMILIES,
    FAMILY_ATTRIBUTE,
    POSITIONS,
    SHAPES,
    SHIFT_STYLES,
    SIZES,
    STYLES,
    TEXTURES,
    family_classnames,
)
from .render import SampleSpec, render, sample_specs

__all__ = [
    "BACKGROUNDS",
    "CODED_FAMILIES",
    "COLOURS",
    "FAMILIES",
    "FAMILY_ATTRIBUTE",
    "POSITIONS",
    "SHAPES",
    "SHIFT_STYLES",
    "SIZES",
    "STYLES",
    "TEXTURES",
    "SampleSpec",
    "caption",
    "family_classnames",
    "family_specs",
    "make_dataset",
    "random_caption",
    "render",
    "render_pool",
    "sample_specs",
    "write_imagefolder",
]
