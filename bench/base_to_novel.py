"""Base-to-novel on the procedural world, for every method, written as a Markdown table.

    python bench/base_to_novel.py --out docs/base_to_novel.md

For each task family (shape, colour) the classes are split CoOp-style (first half base, second half
novel); each trained method learns from 16 shots per base class, is exported as a bundle, and the bundle
is scored through the service's own text path on held-out images of base and of novel classes. Every
row is the mean (± std) over 3 seeds. MaPLe rows run the image tower on every step (clean images, as the
cached rows' single view), with fewer epochs to keep the run to a few minutes on a shared CPU.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))

from service.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from service.bundle import Bundle, Manifest, encode_bundle  # noqa: E402
from trainer.data import Dataset, Sample, load_dataset  # noqa: E402
from trainer.engine import TrainConfig, train_cached, train_on_images  # noqa: E402
from trainer.evaluate import evaluate_base_novel  # noqa: E402
from trainer.features import encode_samples  # noqa: E402
from trainer.fewshot import base_novel_split, sample_few_shot  # noqa: E402
from trainer.methods import build_learner, make_config  # noqa: E402
from trainer.world.dataset import write_imagefolder  # noqa: E402
from trainer.world.families import FAMILIES, STYLES, family_classnames  # noqa: E402

ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class Recipe:
    """One table row: a trainer method with its options and training schedule (None = zero-shot)."""

    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


# CoOp's recipe (SGD, cosine, 1 warm-up epoch) at 10x its ImageNet lr: 200 steps at 0.002 leave the tiny
# model's prompt where it started. RLP trains its factors with AdamW, which its zero-initialized A needs.
SGD = {"optimizer": "sgd", "lr": 0.02}
# MaPLe (n_ctx 2, depth 9 clamped to the tiny CLIP's 3 text blocks): SGD as above, MAPLE_EPOCHS epochs.
MAPLE_EPOCHS = 10
MAPLE = {"optimizer": "sgd", "lr": 0.02, "epochs": MAPLE_EPOCHS}
RECIPES: dict[str, Recipe] = {
    "zero-shot CLIP": Recipe(None),
    "CoOp": Recipe("coop", {"n_ctx": 4}, SGD),
    "QCoOp 1-bit": Recipe("qprompt", {"n_ctx": 4, "bits": 1}, SGD),
    "QCoOp 2-bit": Recipe("qprompt", {"n_ctx": 4, "bits": 2}, SGD),
    "QCoOp 4-bit": Recipe("qprompt", {"n_ctx": 4, "bits": 4}, SGD),
    "RLP (rank 1)": Recipe("rlp", {"n_ctx": 4, "rank": 1}, {"optimizer": "adamw", "lr": 0.01}),
    **{name: Recipe(method, {"bits": bits} if bits else {}, MAPLE) for name, method, bits in (
        ("MaPLe", "maple", None), ("QMaPLe 1-bit", "qmaple", 1), ("QMaPLe 2-bit", "qmaple", 2),
        ("QMaPLe 4-bit", "qmaple", 4))},
}


@dataclass
class Outcome:
    base: float
    novel: float
    hm: float
    bundle_bytes: int
    parameters: int
    seconds: float


def world_dataset(root: Path, family: str, style: str, train_per_class: int, test_per_class: int,
                  size: int) -> Dataset:
    """An ImageFolder tree of the family (train and test rendered from different seeds, the training images'
    captions in train/descriptions.tsv), made once."""
    folder = root / f"{family}-{style}-{size}px-{train_per_class}-{test_per_class}"
    if not (folder / "test").is_dir() or not (folder / "train" / "descriptions.tsv").is_file():
        write_imagefolder(folder / "train", family, train_per_class, seed=1, style=style, size=size,
                          descriptions=True)
        write_imagefolder(folder / "test", family, test_per_class, seed=2, style=style, size=size)
    # ImageFolder labels classes in folder-name order; the world's own order is the label order here.
    names = family_classnames(family)
    dataset, index = load_dataset(folder, "imagefolder"), {n: i for i, n in enumerate(names)}
    splits = {s: [Sample(x.path, index[x.classname], x.classname) for x in xs] for s, xs in dataset.splits.items()}
    return Dataset(family, tuple(names), splits)


def zero_shot_bundle(backbone: Backbone, classnames: tuple[str, ...]) -> Bundle:
    manifest = Manifest("zeroshot", backbone.ref(), classnames, options={"templates": [ZERO_SHOT_TEMPLATE]})
    return Bundle(manifest, {})


def run(recipe: Recipe, backbone: Backbone, dataset: Dataset, seed: int, args: argparse.Namespace) -> Outcome:
    base, _ = base_novel_split(dataset.classnames)
    start = time.perf_counter()
    if recipe.method is None:
        bundle, parameters = zero_shot_bundle(backbone, base.classnames), 0
    else:
        samples = sample_few_shot(base.select(dataset.split("train")), args.shots, seed)
        learner = build_learner(recipe.method, make_config(recipe.method, **recipe.options), backbone,
                                base.classnames)
        cfg = TrainConfig(**({"epochs": args.epochs, "seed": seed} | recipe.train))
        if learner.needs_image_tower:
            train_on_images(learner, backbone, samples, cfg, transform=backbone.preprocess)
        else:
            train_cached(learner, encode_samples(backbone, samples, views=args.views, seed=seed), cfg)
        bundle, parameters = Bundle(*learner.export()), learner.trainable_parameters()
    seconds = time.perf_counter() - start
    result = evaluate_base_novel(bundle, backbone, dataset)
    size = len(encode_bundle(bundle.manifest, bundle.tensors))
    return Outcome(result.base.top1, result.novel.top1, result.hm, size, parameters, seconds)


def mean_std(values: list[float], with_std: bool = True) -> str:
    if with_std and len(values) > 1:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{statistics.mean(values):.1f}"


def table(rows: dict[str, list[Outcome]], with_std: bool = True) -> str:
    lines = ["| method | Base | Novel | HM | bundle bytes | trainable params | train time (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, outcomes in rows.items():
        lines.append(
            f"| {name} | {mean_std([o.base for o in outcomes], with_std)} "
            f"| {mean_std([o.novel for o in outcomes], with_std)} | {mean_std([o.hm for o in outcomes], with_std)} "
            f"| {outcomes[0].bundle_bytes} | {outcomes[0].parameters} "
            f"| {statistics.mean(o.seconds for o in outcomes):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--style", default="faint", choices=STYLES,
                        help="rendering style of train and test images (photo is saturated: zero-shot ≈ 99%%)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--views", type=int, default=1,
                        help="cached views per training image (random crops of 48 px images hurt, so 1)")
    parser.add_argument("--train-per-class", type=int, default=32, help="pool the shots are drawn from")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), help="row names from RECIPES")
    parser.add_argument("--data", default="var/world-data", help="where rendered datasets are cached")
    parser.add_argument("--out", help="write the Markdown report here (default: print only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    backbone = load_backbone(BackboneSpec(args.model, args.pretrained or None, device="cpu"))
    size = backbone.model.visual.image_size[0]
    started = time.perf_counter()
    sections, overall = [], {name: [] for name in args.methods}
    for family in args.families:
        dataset = world_dataset(Path(args.data), family, args.style, args.train_per_class, args.test_per_class,
                                size)
        rows = {}
        for name in args.methods:
            rows[name] = [run(RECIPES[name], backbone, dataset, seed, args) for seed in args.seeds]
            overall[name] += rows[name]
            print(f"{family:>7} {name:<16} " + mean_std([o.hm for o in rows[name]]) + " HM", flush=True)
        sections.append(f"### Family: {family} ({len(dataset.classnames)} classes, "
                        f"{len(dataset.classnames) - len(dataset.classnames) // 2} base)\n\n{table(rows)}")
    report = "\n\n".join([
        f"## Base-to-novel on the procedural world ({args.model}, pretrained {args.pretrained}, "
        f"{args.style} images)",
        f"{args.shots} shots per base class, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
        f"{args.epochs} epochs over {args.views} cached views (MaPLe rows: {MAPLE_EPOCHS} epochs through the "
        f"image tower on clean images); accuracy in %, mean ± std over seeds. "
        f"Total wall time {time.perf_counter() - started:.0f} s on {backbone.device}.\n\n"
        f"Command: `python bench/base_to_novel.py {' '.join(sys.argv[1:])}`",
        "### Average over families (mean of every run)\n\n" + table(overall, with_std=False),
        *sections,
    ])
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
