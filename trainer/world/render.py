"""Deterministic procedural renderer for the tiny world.

A :class:`SampleSpec` fixes every attribute of one image plus a per-image ``seed`` that drives the
small nuisances (rotation jitter, colour jitter, shading, noise, texture phase). ``render(spec, style,
size)`` is a pure function of its arguments: the same call gives the same pixels on every machine
(Pillow drawing + numpy arithmetic, no global random state).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .families import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, STYLES, TEXTURES

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down for anti-aliasing


@dataclass(frozen=True)
class SampleSpec:
    shape: str
    colour: str
    size: str = "medium"
    position: str = "center"
    background: str = "light"
    texture: str = "plain"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
            ("texture", self.texture, TEXTURES),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def luminance(rgb: tuple[float, float, float]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def contrasting_background(colour: str, preferred: str) -> str:
    """Return ``preferred`` unless the shape would nearly vanish on it, then the other tone."""
    lum = luminance(COLOURS[colour])
    # light backgrounds are ~185..225 in luminance, dark ones ~25..60
    if preferred == "light" and lum > 150:
        return "dark"
    if preferred == "dark" and lum < 90:
        return "light"
    return preferred


def sample_specs(n: int, seed: int, **fixed: str) -> list[SampleSpec]:
    """Draw ``n`` specs uniformly over the attributes, deterministically from ``seed``.

    Keyword arguments fix attributes (e.g. ``shape="star"``). The background tone is flipped when
    it would give too little contrast with the shape colour, so every image shows its shape.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    out = []
    for _ in range(n):
        shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
        colour = fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
        size = fixed.get("size") or list(SIZES)[rng.integers(len(SIZES))]
        # centred 60% of the time: fewer nuisances for the shape family
        position = fixed.get("position") or (
            "center" if rng.random() < 0.6 else list(POSITIONS)[1 + rng.integers(len(POSITIONS) - 1)]
        )
        background = fixed.get("background") or BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if "background" not in fixed:
            background = contrasting_background(colour, background)
        texture = fixed.get("texture") or TEXTURES[rng.integers(len(TEXTURES))]
        img_seed = int(rng.integers(2**31 - 1))
        out.append(SampleSpec(shape, colour, size, position, background, texture, img_seed))
    return out


# ----------------------------------------------------------------------------------------------
# geometry: every shape is drawn in a unit box [-1, 1]^2 (y down), then scaled and placed.


def _regular_polygon(n: int, r: float, start_deg: float) -> list[tuple[float, float]]:
    return [
        (r * math.cos(math.radians(start_deg + 360.0 * k / n)), r * math.sin(math.radians(start_deg + 360.0 * k / n)))
        for k in range(n)
    ]


def _star(points: int, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_in
        a = math.radians(-90.0 + 180.0 * k / points)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _bar(cx: float, cy: float, half_len: float, half_thick: float, angle_deg: float) -> list[tuple[float, float]]:
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    corners = [(-half_len, -half_thick), (half_len, -half_thick), (half_len, half_thick), (-half_len, half_thick)]
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(96):
        t = 2 * math.pi * k / 96
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -(y + 2.5) / 15.5))
    return pts


# Each entry: (op, kind, params). op "+" draws, "-" erases.
# kinds: "poly" (points), "ellipse" (cx, cy, rx, ry), "pie" (cx, cy, r, start, end)
ShapeOp = (
    tuple[str, Literal["poly"], list[tuple[float, float]]]
    | tuple[str, Literal["ellipse"], tuple[float, float, float, float]]
    | tuple[str, Literal["pie"], tuple[float, float, float, float, float]]
)


def _shape_ops(shape: str) -> list[ShapeOp]:
    if shape == "circle":
        return [("+", "ellipse", (0.0, 0.0, 1.0, 1.0))]
    if shape == "ellipse":
        return [("+", "ellipse", (0.0, 0.0, 1.0, 0.52))]
    if shape == "square":
        return [("+", "poly", [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)])]
    if shape == "triangle":
        return [("+", "poly", [(x, y + 0.22) for x, y in _regular_polygon(3, 1.12, -90.0)])]
    if shape == "pentagon":
        return [("+", "poly", [(x, y + 0.08) for x, y in _regular_polygon(5, 1.0, -90.0)])]
    if shape == "hexagon":
        return [("+", "poly", _regular_polygon(6, 1.0, 0.0))]
    if shape == "star":
        return [("+", "poly", [(x, y + 0.1) for x, y in _star(5, 1.05, 0.42)])]
    if shape == "cross":
        return [("+", "poly", _bar(0, 0, 1.15, 0.24, 45.0)), ("+", "poly", _bar(0, 0, 1.15, 0.24, -45.0))]
    if shape == "plus":
        return [("+", "poly", _bar(0, 0, 0.95, 0.26, 0.0)), ("+", "poly", _bar(0, 0, 0.95, 0.26, 90.0))]
    if shape == "heart":
        return [("+", "poly", _heart())]
    if shape == "diamond":
        return [("+", "poly", [(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)])]
    if shape == "ring":
        return [("+", "ellipse", (0.0, 0.0, 1.0, 1.0)), ("-", "ellipse", (0.0, 0.0, 0.55, 0.55))]
    if shape == "arrow":
        return [("+", "poly", [(-1.0, -0.22), (0.15, -0.22), (0.15, -0.62), (1.0, 0.0),
                               (0.15, 0.62), (0.15, 0.22), (-1.0, 0.22)])]
    if shape == "crescent":
        return [("+", "ellipse", (0.0, 0.0, 1.0, 1.0)), ("-", "ellipse", (0.42, -0.12, 0.82, 0.82))]
    if shape == "trapezoid":
        return [("+", "poly", [(-0.5, -0.6), (0.5, -0.6), (1.0, 0.6), (-1.0, 0.6)])]
    if shape == "semicircle":
        return [("+", "pie", (0.0, 0.42, 1.05, 180.0, 360.0))]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(
    shape: str,
    size: int,
    box: float,
    centre: tuple[float, float],
    rotation_deg: float = 0.0,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Anti-aliased coverage mask (float32 in [0, 1], shape ``(size, size)``) of one shape.

    ``box`` is the shape's bounding-box side in pixels, ``centre`` its centre in pixels.
    """
    ss = supersample
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    half = box * ss / 2.0
    cx, cy = centre[0] * ss, centre[1] * ss
    rot = math.radians(rotation_deg)
    cr, sr = math.cos(rot), math.sin(rot)

    def tx(x: float, y: float) -> tuple[float, float]:
        return (cx + half * (x * cr - y * sr), cy + half * (x * sr + y * cr))

    for op in _shape_ops(shape):
        fill = 255 if op[0] == "+" else 0
        match op:  # by kind, which also tells the type checker the params' shape
            case (_, "poly", points):
                draw.polygon([tx(x, y) for x, y in points], fill=fill)
            case (_, "ellipse", (ex, ey, rx, ry)):
                if abs(rx - ry) < 1e-9:  # circles are rotation invariant; draw exactly
                    x0, y0 = tx(ex, ey)
                    r = rx * half
                    draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
                else:
                    n = 96
                    angles = [2 * math.pi * k / n for k in range(n)]
                    pts = [(ex + rx * math.cos(a), ey + ry * math.sin(a)) for a in angles]
                    draw.polygon([tx(x, y) for x, y in pts], fill=fill)
            case (_, "pie", (ex, ey, r, a0, a1)):
                n = 64
                angles = [math.radians(a0 + (a1 - a0) * k / n) for k in range(n + 1)]
                pts = [(ex, ey)] + [(ex + r * math.cos(a), ey + r * math.sin(a)) for a in angles]
                draw.polygon([tx(x, y) for x, y in pts], fill=fill)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _outline_coverage(shape: str, size: int, box: float, centre: tuple[float, float], rotation: float,
                      stroke_px: float) -> np.ndarray:
    """Coverage of a stroke of ``stroke_px`` pixels along the inside of the silhouette.

    Computed at the supersampled resolution as (shape minus its erosion), then box-filtered down.
    """
    ss = 2
    full = shape_mask(shape, size * ss, box * ss, (centre[0] * ss, centre[1] * ss), rotation, supersample=2)
    mask = Image.fromarray((full * 255).astype(np.uint8))
    eroded = mask
    for _ in range(max(1, int(round(stroke_px * ss)))):  # noqa: RUF046  (numpy floats round to floats)
        eroded = eroded.filter(ImageFilter.MinFilter(3))
    ring = np.asarray(mask, dtype=np.float32) - np.asarray(eroded, dtype=np.float32)
    small = Image.fromarray(np.clip(ring, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# backgrounds and textures


def _background(spec: SampleSpec, size: int, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
    if spec.background == "light":
        base = rng.uniform(190, 222)
    else:
        base = rng.uniform(28, 58)
    tint = rng.normal(0.0, 6.0, size=3)  # low-saturation tint, never a nameable colour
    bg = np.full((size, size, 3), base, dtype=np.float32) + tint.astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    amp = 14.0 * contrast * (1 if spec.background == "light" else 0.8)
    phase = rng.uniform(0, 2 * math.pi)
    if spec.texture == "striped":
        period = rng.uniform(0.12, 0.22)
        ang = rng.choice([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])
        u = xx * math.cos(ang) + yy * math.sin(ang)
        pat = np.sign(np.sin(2 * math.pi * u / period + phase))
    elif spec.texture == "dotted":
        period = rng.uniform(0.12, 0.18)
        gx = np.sin(2 * math.pi * xx / period + phase)
        gy = np.sin(2 * math.pi * yy / period + phase)
        pat = np.where((gx > 0.6) & (gy > 0.6), 1.0, -0.25)
    elif spec.texture == "checkered":
        period = rng.uniform(0.2, 0.3)
        pat = np.where((np.floor(xx / period * 2) + np.floor(yy / period * 2)) % 2 == 0, 1.0, -1.0)
    elif spec.texture == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        pat = 2.0 * ((xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang))
        amp *= 1.5
    else:  # plain
        pat = np.zeros((size, size), dtype=np.float32)
    return bg + (amp * pat)[..., None].astype(np.float32)


# ----------------------------------------------------------------------------------------------


def _layout(spec: SampleSpec, size: int, rng: np.random.Generator) -> tuple[float, tuple[float, float], float]:
    frac = SIZES[spec.size] * rng.uniform(0.94, 1.06)
    box = frac * size
    margin = (size - box) / 2.0
    dx, dy = POSITIONS[spec.position]
    reach = 0.5 * margin
    jitter = 0.08 * margin
    cx = size / 2.0 + dx * reach + rng.uniform(-jitter, jitter)
    cy = size / 2.0 + dy * reach + rng.uniform(-jitter, jitter)
    rotation = rng.uniform(-6.0, 6.0)
    return box, (cx, cy), rotation


def render(spec: SampleSpec, style: str = "photo", size: int = 64) -> Image.Image:
    """Render one image (RGB, ``size`` x ``size``) of ``spec`` in ``style``.

    Styles: ``photo`` (filled, shaded shape on a lightly textured background, mild sensor noise),
    ``outline`` (only a coloured stroke along the silhouette, plain background), ``noisy`` (filled
    shape with strong noise, grey clutter, lower contrast and blur), ``faint`` (the same degradations,
    much stronger). Deterministic in its arguments.
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {list(STYLES)}")
    rng = np.random.default_rng([spec.seed, 0xC0DE])
    box, centre, rotation = _layout(spec, size, rng)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)

    if style == "outline":
        bg = _background(SampleSpec(**{**spec.to_dict(), "texture": "plain"}), size, rng)
        stroke = max(1.0, 0.06 * box)
        cover = _outline_coverage(spec.shape, size, box, centre, rotation, stroke)
        fill = np.broadcast_to(colour, (size, size, 3))
        img = bg * (1 - cover[..., None]) + fill * cover[..., None]
        img = img + rng.normal(0.0, 2.0, size=img.shape)
        return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")

    contrast = 1.0 if style == "photo" else 1.6
    bg = _background(spec, size, rng, contrast=contrast)
    cover = shape_mask(spec.shape, size, box, centre, rotation)
    # soft directional lighting over the shape
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + 0.10 * ((xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang)) * 2.0
    fill = colour[None, None, :] * shade[..., None]
    if spec.colour == "black":
        fill = fill + 10.0 * (shade[..., None] - 1.0) * 4.0
    img = bg * (1 - cover[..., None]) + fill * cover[..., None]

    if style == "photo":
        img = img + rng.normal(0.0, 3.0, size=img.shape)
        out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
        return out

    return _degrade(img, rng, size, **DEGRADATION[style])


# noisy: grey clutter, contrast x0.8, a light blur, strong noise; faint: the same, much further
DEGRADATION = {
    "noisy": {"contrast": 0.8, "blur": 0.6, "noise": 22.0},
    "faint": {"contrast": 0.3, "blur": 1.0, "noise": 40.0},
}


def _degrade(img: np.ndarray, rng: np.random.Generator, size: int, contrast: float, blur: float,
             noise: float) -> Image.Image:
    """Grey clutter strokes, reduced contrast, blur and sensor noise over a rendered image."""
    clutter = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        draw.line([(x0, y0), (x1, y1)], fill=int(rng.integers(60, 200)), width=int(rng.integers(1, 3)))
    cl = np.asarray(clutter, dtype=np.float32) / 255.0
    grey = rng.uniform(60, 200)
    img = img * (1 - 0.7 * cl[..., None]) + grey * 0.7 * cl[..., None]
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + contrast * (img - mean)
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    out = out.filter(ImageFilter.GaussianBlur(radius=blur))
    arr = np.asarray(out, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
