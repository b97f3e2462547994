"""The embedded tiny CLIP's zero-shot top-1 on the world test sets at every image precision, against fp32.

    python bench/precision_world.py                  # the model card's sets: 50 per class, seed 10000, 3 styles

The sets are the tiny CLIP's own evaluation sets (service/assets/tiny_clip/metrics.json: `eval`), rendered by
trainer/world; images go through the service's preprocessing and image encoder, class texts through its text path
("a photo of a {}."). Issue 22's bar: every set within 0.5 point of fp32. Also printed: the share of images whose
top-1 label is fp32's, and each precision's startup check (its agreement on the calibration set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from service.bundle.codec import Bundle  # noqa: E402
from service.bundle.manifest import Manifest  # noqa: E402
from service.core.backbone import ASSETS, Backbone, BackboneSpec, load_backbone  # noqa: E402
from service.serving.text_features import text_features  # noqa: E402
from trainer.world import FAMILIES  # noqa: E402
from trainer.world.pretrain import EvalSets, build_eval_sets  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")
MAX_POINTS_FROM_FP32 = 0.5


def model_card_sets() -> EvalSets:
    """The world test sets the tiny CLIP's model card reports, exactly as pretraining rendered them."""
    spec = json.loads((ASSETS / "tiny_clip" / "metrics.json").read_text())["eval"]
    return build_eval_sets(spec["per_class"], spec["seed"], 48, spec["styles"])


def tiny_backbone(precision: str, onnx_cache_dir: str) -> Backbone:
    return load_backbone(BackboneSpec("promptserve-tiny", "world-v1", device="cpu", image_backend="auto",
                                      image_precision=precision, onnx_cache_dir=onnx_cache_dir))


def world_top1(sets: EvalSets, onnx_cache_dir: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]],
                                                              dict[str, Backbone]]:
    """Top-1 per set and precision, the share of each set's images with fp32's top-1 label, and the backbones (each
    must serve the precision asked for: a fallback to fp32 would make the comparison say nothing). Images go through
    the service's preprocessing (once: it is the same for every precision) and image encoder, class texts through
    its text path."""
    backbones = {p: tiny_backbone(p, onnx_cache_dir) for p in PRECISIONS}
    for precision, backbone in backbones.items():
        if backbone.image_precision != precision:
            raise RuntimeError(f"{precision} fell back: {backbone.precision_choice.fallback}")
    fp32 = backbones["fp32"]
    top1: dict[str, dict[str, float]] = {}
    agree: dict[str, dict[str, float]] = {}
    for (family, style), (images, labels) in sets.items():
        name = f"{family}/{style}"
        pixels = torch.stack([fp32.preprocess(Image.fromarray(a.numpy())) for a in images])
        classes = text_features(Bundle(Manifest("zeroshot", fp32.ref(), tuple(FAMILIES[family])), {}), fp32)
        predicted = {p: torch.cat([(b.encode_images(pixels[i:i + 256]) @ classes.T).argmax(-1)
                                   for i in range(0, len(pixels), 256)]) for p, b in backbones.items()}
        top1[name] = {p: float((y == labels).float().mean()) for p, y in predicted.items()}
        agree[name] = {p: float((y == predicted["fp32"]).float().mean()) for p, y in predicted.items()}
    return top1, agree, backbones


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-cache-dir", default="var/onnx")
    args = parser.parse_args()
    sets = model_card_sets()
    top1, agree, backbones = world_top1(sets, args.onnx_cache_dir)
    images = sum(len(y) for _, y in sets.values())
    print(f"Tiny CLIP zero-shot top-1 on the world test sets ({len(sets)} sets, {images} images), by image precision; "
          "points from fp32, and the share of images with fp32's top-1 label\n")
    print("| set | images | fp32 | " + " | ".join(f"{p} (points from fp32; same top-1)" for p in PRECISIONS[1:]) + " |")
    print("|---" * (3 + len(PRECISIONS) - 1) + "|")
    worst = 0.0
    for (family, style), (_, y) in sets.items():
        name = f"{family}/{style}"
        cells = []
        for p in PRECISIONS[1:]:
            points = 100 * (top1[name][p] - top1[name]["fp32"])
            worst = max(worst, abs(points))
            cells.append(f"{100 * top1[name][p]:.2f}% ({points:+.2f}; {agree[name][p]:.2%})")
        print(f"| {name} | {len(y)} | {100 * top1[name]['fp32']:.2f}% | " + " | ".join(cells) + " |")
    print(f"\nlargest difference from fp32: {worst:.2f} points (bar: {MAX_POINTS_FROM_FP32})")
    for p in PRECISIONS[1:]:
        print(f"{p} startup check: {backbones[p].precision_choice.trials[-1].summary()}")


if __name__ == "__main__":
    main()
