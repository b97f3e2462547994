"""Natural-language captions for world images.

``caption(spec, style)`` gives one canonical caption; ``random_caption(spec, style, rng)`` gives the
varied captions used for contrastive pretraining together with the set of attributes the caption
actually names, so a loss can tell which other images in a batch the caption also describes.

The article is always "a" (as in the usual "a photo of a {}." template), so the zero-shot and
prompt-learning templates see the same token sequence as the captions.
"""

from __future__ import annotations

import numpy as np

from .render import SampleSpec

STYLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a", "a picture of a", "an image of a"),
    "outline": ("an outline drawing of a", "a line drawing of a", "a sketch of a"),
    "noisy": ("a noisy photo of a", "a grainy picture of a", "a blurry photo of a"),
    "faint": ("a faint photo of a", "a dim picture of a", "a washed-out photo of a"),
}
GENERIC_PREFIX = "a photo of a"

POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

LONG_PREFIXES = (
    "a low resolution photo of a",
    "this is a picture showing a",
    "a small toy world image that contains a",
)

# Attribute names a caption can mention; "style" is mentioned only by style-specific prefixes.
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background", "texture", "style")


def _background_phrase(spec: SampleSpec) -> tuple[str, set[str]]:
    if spec.texture == "plain":
        return f"on a {spec.background} background", {"background"}
    return f"on a {spec.background} {spec.texture} background", {"background", "texture"}


def caption(spec: SampleSpec, style: str = "photo", detail: str = "full") -> str:
    """Canonical caption. ``detail``: ``full``, ``short`` (colour + shape), ``shape`` or ``colour``."""
    prefix = STYLE_PREFIXES[style][0]
    if detail == "full":
        bg, _ = _background_phrase(spec)
        return f"{prefix} {spec.size} {spec.colour} {spec.shape} {POSITION_PHRASES[spec.position]} {bg}."
    if detail == "short":
        return f"{prefix} {spec.colour} {spec.shape}."
    if detail == "shape":
        return f"{prefix} {spec.shape}."
    if detail == "colour":
        return f"{prefix} {spec.colour}."
    raise ValueError(f"unknown detail {detail!r}")


def random_caption(spec: SampleSpec, style: str, rng: np.random.Generator) -> tuple[str, frozenset[str]]:
    """A varied training caption for ``spec`` rendered in ``style`` and the attributes it names."""
    mentions: set[str] = set()
    if rng.random() < 0.5:
        prefix = GENERIC_PREFIX
    else:
        options = STYLE_PREFIXES[style]
        prefix = options[int(rng.integers(len(options)))]
        if style != "photo" and prefix != GENERIC_PREFIX:
            mentions.add("style")
    r = rng.random()
    if r < 0.30:  # rich description
        words = []
        if rng.random() < 0.7:
            words.append(spec.size)
            mentions.add("size")
        words += [spec.colour, spec.shape]
        mentions |= {"colour", "shape"}
        if rng.random() < 0.4:
            words.append(POSITION_PHRASES[spec.position])
            mentions.add("position")
        if rng.random() < 0.6:
            bg, m = _background_phrase(spec)
            words.append(bg)
            mentions |= m
        text = f"{prefix} {' '.join(words)}."
    elif r < 0.55:  # colour + shape
        text = f"{prefix} {spec.colour} {spec.shape}."
        mentions |= {"colour", "shape"}
    elif r < 0.72:  # shape only
        text = f"{prefix} {spec.shape}."
        mentions.add("shape")
    elif r < 0.87:  # colour only
        form = int(rng.integers(3))
        text = (
            f"{prefix} {spec.colour}.",
            f"{prefix} {spec.colour} shape.",
            f"{prefix} {spec.colour} object.",
        )[form]
        mentions.add("colour")
    else:  # long captions: train positional embeddings up to ~28 tokens
        long_prefix = LONG_PREFIXES[int(rng.integers(len(LONG_PREFIXES)))]
        bg, m = _background_phrase(spec)
        where = POSITION_PHRASES[spec.position]
        text = f"{long_prefix} {spec.size} {spec.colour} {spec.shape} {where} of the frame, drawn {bg}."
        mentions = {"size", "colour", "shape", "position"} | m
    return text, frozenset(mentions)
