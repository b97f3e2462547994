"""Vocabulary of the procedural world: the attribute values and the task families.

Everything here is plain data so that the renderer, the captioner, the pretraining script and the
few-shot dataset builders agree on names and order. Class order is part of the contract: label ``i``
of a family is ``FAMILIES[family][i]``.
"""

from __future__ import annotations

# Shapes chosen to stay distinct at 48..64 px: filled silhouettes with different corner counts,
# holes, concavities or aspect ratios. Orientation is fixed (only a few degrees of jitter), so
# "diamond" vs "square" and the direction of the arrow stay meaningful.
SHAPES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "square",
    "triangle",
    "pentagon",
    "hexagon",
    "star",
    "cross",
    "plus",
    "heart",
    "diamond",
    "ring",
    "arrow",
    "crescent",
    "trapezoid",
    "semicircle",
)

# Sixteen named colours, spread over hue and lightness so that neighbours stay apart after the
# per-image jitter (at most +-12 per channel and a mild shading factor).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (245, 130, 20),
    "yellow": (250, 220, 30),
    "lime": (160, 230, 40),
    "green": (20, 140, 40),
    "teal": (0, 128, 128),
    "cyan": (40, 220, 235),
    "blue": (30, 80, 230),
    "navy": (15, 25, 110),
    "purple": (120, 50, 170),
    "magenta": (225, 30, 200),
    "pink": (255, 160, 200),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}

# Relative size of the shape's bounding box (fraction of the canvas side).
SIZES: dict[str, float] = {"small": 0.5, "medium": 0.64, "large": 0.8}

# Position of the shape's centre; offsets are a fraction of the free margin.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.0, 0.0),
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
}

# Background tone. Named with words that are not colour classes, so "red" always means the shape.
BACKGROUNDS: tuple[str, ...] = ("light", "dark")

# Low-contrast background texture.
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient")

# Rendering styles. "photo" is the source domain; "outline" and "noisy" are domain shifts. "faint" (added
# after the tiny CLIP was pretrained, never seen by it) degrades the image far enough that zero-shot is
# clearly imperfect, so few-shot prompt learning has room to help: the base-to-novel benchmark uses it.
STYLES: tuple[str, ...] = ("photo", "outline", "noisy", "faint")
SHIFT_STYLES: tuple[str, ...] = ("outline", "noisy", "faint")

# Composite classes "<colour> <shape>" over a 6 × 6 grid, ordered so that the first half (the base classes
# of the CoOp split) is the grid's checkerboard: every colour and every shape is seen in base training, and
# each novel class is a new *combination* of seen words.
COMPOSITE_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple", "white")
COMPOSITE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")


def _checkerboard(rows: tuple[str, ...], cols: tuple[str, ...]) -> list[str]:
    cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    ordered = [c for c in cells if sum(c) % 2 == 0] + [c for c in cells if sum(c) % 2 == 1]
    return [f"{rows[i]} {cols[j]}" for i, j in ordered]


FAMILIES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "composite": _checkerboard(COMPOSITE_COLOURS, COMPOSITE_SHAPES),
}

# The attribute(s) of a SampleSpec that each family reads its label from (composite: colour, then shape).
FAMILY_ATTRIBUTE: dict[str, str] = {"shape": "shape", "colour": "colour", "composite": "colour shape"}

# Families whose class names are codes that say nothing about the image ("class-00" ... "class-15"): the
# label is still an attribute (here the shape), but only per-image descriptions carry its meaning. Kept out
# of FAMILIES (pretraining and zero-shot checks iterate that); TGP-T's ambiguous-name benchmark uses it.
CODED_FAMILIES: dict[str, str] = {"shape-code": "shape"}  # coded family → the family whose attribute it labels


def family_classnames(family: str) -> list[str]:
    """Class names of a family or of a coded family (label i is the same attribute value either way)."""
    if family in CODED_FAMILIES:
        return [f"class-{i:02d}" for i in range(len(FAMILIES[CODED_FAMILIES[family]]))]
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {list(FAMILIES) + list(CODED_FAMILIES)}")
    return FAMILIES[family]
