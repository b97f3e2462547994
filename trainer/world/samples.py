"""Write the sample images the README's curl example classifies: `python -m trainer.world.samples`."""

from __future__ import annotations

from pathlib import Path

from .render import render, sample_specs

SAMPLES = (("star", "red"), ("circle", "blue"), ("triangle", "green"), ("heart", "yellow"))
OUT = Path(__file__).resolve().parents[2] / "service" / "assets" / "samples"


def write_samples(out: Path = OUT, size: int = 96) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shape, colour in SAMPLES:
        (spec,) = sample_specs(1, seed=7, shape=shape, colour=colour, size="large", position="center")
        path = out / f"{colour}_{shape}.png"
        render(spec, "photo", size=size).save(path, optimize=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_samples():
        print(written)
