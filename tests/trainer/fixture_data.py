"""Small on-disk datasets made on the fly: coloured shapes a micro CLIP can tell apart from cached features."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def draw(colour: tuple[int, int, int], rng: random.Random, size: int = 32) -> Image.Image:
    """A jittered square of `colour` at a random place on a grey background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(100, 150) for _ in range(3)))
    side = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour)
    ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=fill)
    return image


def write_images(folder: Path, per_class: int, seed: int, classes: list[str] | None = None) -> list[tuple[str, str]]:
    """`folder/<class>/<i>.png`; returns (relative path, class) pairs."""
    rng = random.Random(seed)
    out = []
    for name in classes or list(COLOURS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(COLOURS[name], rng).save(folder / name / f"{i}.png")
            out.append((f"{name}/{i}.png", name))
    return out


def make_coop(root: Path, train: int = 8, test: int = 6, classes: list[str] | None = None) -> Path:
    """CoOp layout: root/split_zhou_colours.json with images under root/images/."""
    classes = classes or list(COLOURS)
    label = {c: i for i, c in enumerate(classes)}
    doc = {}
    for split, count, seed in (("train", train, 0), ("val", 2, 1), ("test", test, 2)):
        items = write_images(root / "images" / split, count, seed, classes)
        doc[split] = [[f"{split}/{rel}", label[c], c] for rel, c in items]
    (root / "split_zhou_colours.json").write_text(json.dumps(doc))
    return root


def make_imagefolder(root: Path, per_class: int = 6) -> Path:
    write_images(root / "train", per_class, 0)
    write_images(root / "test", 3, 1)
    return root


def make_csv(root: Path, per_class: int = 6) -> Path:
    items = write_images(root / "img", per_class, 0)
    path = root / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for i, (rel, c) in enumerate(items):
            writer.writerow([f"img/{rel}", c, "test" if i % 3 == 0 else "train"])
    return path
