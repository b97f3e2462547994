"""Time one training epoch from cached image features against recomputing the image tower every step.

    PYTHONPATH=. python bench/bench_feature_cache.py --model ViT-B-16 --classes 8 --images-per-class 8

Both runs train the same CoOp learner with the same batches on a freshly drawn dataset of coloured squares
(random-weight backbone: the timing does not depend on the weights). Images are decoded once before either
loop, so the uncached time is the image tower's, not the decoder's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from service.core.backbone import BackboneSpec, load_backbone
from trainer.data import Sample
from trainer.engine import TrainConfig, train_learner
from trainer.features import CLEAN, encode_samples, fresh_set
from trainer.methods import build_learner, make_config

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "cyan"]


def make_samples(folder: Path, classes: int, per_class: int, size: int) -> list[Sample]:
    rng, samples = random.Random(0), []
    for label, name in enumerate(COLOURS[:classes]):
        for i in range(per_class):
            image = Image.new("RGB", (size, size), (128, 128, 128))
            side = rng.randint(size // 3, size - 1)
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            ImageDraw.Draw(image).rectangle([x, y, x + side, y + side], fill=name)
            path = folder / f"{name}_{i}.png"
            image.save(path)
            samples.append(Sample(path, label, name))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16", help="the papers' backbone")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(BackboneSpec(args.model, device="cpu"))
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, warmup_epochs=0)
    with tempfile.TemporaryDirectory() as tmp:
        samples = make_samples(Path(tmp), args.classes, args.images_per_class, backbone.model.visual.image_size[0])
        classnames = tuple(COLOURS[: args.classes])

        def learner():
            return build_learner("coop", make_config("coop"), backbone, classnames)

        start = time.perf_counter()
        features = encode_samples(backbone, samples, views=args.views)
        cache_seconds = time.perf_counter() - start
        train_learner(learner(), features, cfg)  # warm-up (allocator, autograd graph)
        cached = train_learner(learner(), features, cfg)[0].seconds
        fresh = fresh_set(backbone, samples, CLEAN, lambda pixels, idx: backbone.encode_images(pixels))
        uncached = train_learner(learner(), fresh, cfg)[0].seconds  # the image tower on every step
    print(json.dumps({
        "model": args.model, "images": len(samples), "classes": args.classes, "batch_size": args.batch_size,
        "views": args.views, "threads": args.threads, "cache_build_s": round(cache_seconds, 2),
        "epoch_cached_s": round(cached, 3), "epoch_uncached_s": round(uncached, 2),
        "speedup": round(uncached / cached, 1),
    }))


if __name__ == "__main__":
    main()
