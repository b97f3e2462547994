"""Reduced-precision image encoders on CPU: which precisions this CPU runs fast, and the agreement check a bf16 or
int8 encoder must pass against fp32 before it serves.

The check runs both encoders over a calibration set the project draws itself (coloured shapes on flat, gradient
and noise backgrounds, plus the shipped sample images) and compares the cosine of every image's features and the
top-1 zero-shot label ("a photo of a red star.") each encoder gives it. Thresholds are constants here, listed in
docs/serving.md; below them the service serves fp32 and says why (startup log and /readyz).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

IMAGE_PRECISIONS = ("auto", "fp32", "bf16", "int8")  # CPU; on CUDA the encoder runs fp16 (auto) or fp32
MIN_COSINE = 0.995  # every calibration image's features, reduced against fp32
MIN_TOP1_AGREEMENT = 0.99  # share of the images fp32 decides whose top-1 label stays fp32's
# fp32 "decides" an image when its top label beats the runner-up by this much cosine (0.1 logit at CLIP's logit scale
# of 100); closer than that, either label is a tie and flipping it changes no answer anyone could rely on.
TIE_MARGIN = 1e-3
CALIBRATION_IMAGES = 100
CALIBRATION_CHUNK = 20  # images per timed forward of the check

# CPU flags (Linux /proc/cpuinfo names) with native kernels: int8 dot products (VNNI) and bf16 ones.
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

SAMPLES = Path(__file__).parents[1] / "assets" / "samples"
COLOURS = {"red": (215, 25, 30), "orange": (245, 130, 20), "yellow": (250, 220, 30), "green": (20, 140, 40),
           "blue": (30, 70, 200), "purple": (120, 40, 160), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: then only fp32 is automatic)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def fast_precisions(flags: frozenset[str]) -> list[str]:
    """Reduced precisions this CPU has native kernels for, fastest first."""
    return [p for p, needs in (("int8", INT8_FLAGS), ("bf16", BF16_FLAGS)) if flags & needs]


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    corners = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6, "star": 10}[shape]
    offset = {"square": math.pi / 4, "diamond": 0.0}.get(shape, -math.pi / 2)
    points = []
    for i in range(corners):
        radius = r * (0.45 if shape == "star" and i % 2 else 1.0)
        angle = offset + turn + 2 * math.pi * i / corners
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _background(rng: random.Random, size: int) -> Image.Image:
    kind = rng.choice(("flat", "gradient", "noise"))
    base = tuple(rng.randrange(256) for _ in range(3))
    if kind == "flat":
        return Image.new("RGB", (size, size), base)
    if kind == "gradient":
        other = tuple(rng.randrange(256) for _ in range(3))
        ramp = torch.linspace(0, 1, size)[:, None, None].expand(size, size, 1)
        pixels = torch.tensor(base) * (1 - ramp) + torch.tensor(other) * ramp
        image = Image.fromarray(pixels.to(torch.uint8).numpy())
        return image.rotate(rng.uniform(0, 360)) if rng.random() < 0.5 else image
    noise = torch.Generator().manual_seed(rng.randrange(2**31))
    pixels = torch.tensor(base) + torch.randn(size, size, 3, generator=noise) * rng.uniform(10, 60)
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy())


def calibration_images(count: int = CALIBRATION_IMAGES, size: int = 96) -> list[Image.Image]:
    """The shipped sample images, then coloured shapes drawn from a fixed seed (the same set on every start)."""
    images = [Image.open(path).convert("RGB") for path in sorted(SAMPLES.glob("*.png"))][:count]
    rng = random.Random(0)
    while len(images) < count:
        image = _background(rng, size)
        draw = ImageDraw.Draw(image)
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS.values()))
        r = rng.uniform(0.2, 0.42) * size
        cx, cy = (rng.uniform(r, size - r) for _ in range(2))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.15, 0.15)), fill=colour)
        images.append(image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))))
    return images


def calibration_labels() -> list[str]:
    """Zero-shot labels for the top-1 half of the check: every colour × shape."""
    return [f"a photo of a {colour} {shape}." for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class Agreement:
    """How closely a reduced-precision encoder's features follow fp32's on the calibration set."""

    images: int
    cosine_min: float
    cosine_mean: float
    top1: float  # share of all images with fp32's top-1 label
    decided: int  # images fp32 decides (its top label ahead by at least TIE_MARGIN)
    top1_decided: float  # share of those with fp32's top-1 label (1.0 when there are none)

    def shortfall(self) -> str | None:
        """Why this agreement is not enough to serve, or None."""
        reasons = []
        if not self.cosine_min >= MIN_COSINE:  # `not >=`: a NaN fails
            reasons.append(f"cosine to fp32 {self.cosine_min:.4f} < {MIN_COSINE} on some image")
        if not self.top1_decided >= MIN_TOP1_AGREEMENT:
            reasons.append(f"top-1 agreement {self.top1_decided:.1%} < {MIN_TOP1_AGREEMENT:.0%} on the {self.decided} "
                           "images fp32 decides")
        return "; ".join(reasons) or None


def agreement(reference: torch.Tensor, candidate: torch.Tensor, classes: torch.Tensor) -> Agreement:
    """Agreement of `candidate` features with `reference` ([N, D] each) and their top-1 over `classes` [C, D]."""
    cosine = F.cosine_similarity(candidate.float(), reference.float(), dim=-1)
    scores = reference.float() @ classes.T
    best = scores.topk(min(2, len(classes)), dim=-1).values
    decided = best[:, 0] - best[:, -1] >= TIE_MARGIN if len(classes) > 1 else torch.ones(len(scores), dtype=torch.bool)
    same = ((candidate.float() @ classes.T).argmax(-1) == scores.argmax(-1)).float()
    top1_decided = float(same[decided].mean()) if decided.any() else 1.0
    return Agreement(len(reference), float(cosine.min()), float(cosine.mean()), float(same.mean()),
                     int(decided.sum()), top1_decided)


def timed_features(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                   chunk: int = CALIBRATION_CHUNK) -> tuple[torch.Tensor, float]:
    """Features of every row, and the fastest chunk's seconds per image (after one untimed warm-up chunk): the
    fastest, because other work on the machine only ever slows a chunk down."""
    encode(pixels[:chunk])
    parts, best = [], math.inf
    for start in range(0, len(pixels), chunk):
        rows = pixels[start:start + chunk]
        began = time.perf_counter()
        parts.append(encode(rows))
        best = min(best, (time.perf_counter() - began) / len(rows))
    return torch.cat(parts), best


@dataclass(frozen=True)
class PrecisionTrial:
    """One reduced precision tried at startup: its agreement and speed against fp32, and whether it serves."""

    precision: str
    serves: bool
    reason: str | None  # why it does not serve
    agreement: Agreement | None = None  # None: the encoder could not be built
    speedup: float | None = None  # fp32's seconds per image over this one's, in the check

    def describe(self) -> dict[str, object]:
        out = asdict(self)
        out["agreement"] = asdict(self.agreement) if self.agreement else None
        return out

    def summary(self) -> str:
        if self.agreement is None:
            return f"{self.precision}: {self.reason}"
        a = self.agreement
        return (f"{self.precision}: cosine to fp32 min {a.cosine_min:.4f} mean {a.cosine_mean:.5f}, top-1 agreement "
                f"{a.top1_decided:.1%} on the {a.decided} of {a.images} calibration images fp32 decides ({a.top1:.1%} "
                f"on all), {self.speedup:.2f}x fp32 speed")


@dataclass(frozen=True)
class PrecisionChoice:
    """What was asked for, what serves, and every reduced precision tried on the way."""

    requested: str
    serving: str
    trials: Sequence[PrecisionTrial] = ()

    @property
    def fallback(self) -> str | None:
        """Why the reduced precisions tried and refused do not serve, and what serves instead; None if none was."""
        refused = [t for t in self.trials if not t.serves]
        if not refused:
            return None
        return "; ".join(f"{t.precision} not used: {t.reason}" for t in refused) + f"; serving {self.serving}"

    def describe(self) -> dict[str, object]:
        return {"requested": self.requested, "fallback": self.fallback,
                "thresholds": {"cosine_min": MIN_COSINE, "top1_agreement": MIN_TOP1_AGREEMENT,
                               "tie_margin": TIE_MARGIN},
                "trials": [t.describe() for t in self.trials]}
