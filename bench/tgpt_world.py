"""TGP-T on the procedural world: few-shot accuracy against zero-shot CLIP and CoOp, and on coded class names.

    python bench/tgpt_world.py --out docs/tgpt_world.md

Families: `shape` (real names) and `shape-code` — the very same images, with classes named "class-00" ...
"class-15", so the class names say nothing and only the per-image descriptions (the renderer's captions,
"a faint photo of a small red star on the left ...") carry what the classes are. Every trained row learns
from `--shots` images per class, is exported as a bundle and scored through the service's own path on
held-out images; mean ± std over 3 seeds. "TGP-T, no descriptions" drops the content loss (the
`--allow-missing-descriptions` case) to show what the descriptions add.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.base_to_novel import zero_shot_bundle  # noqa: E402
from service.bundle.codec import Bundle, encode_bundle  # noqa: E402
from service.core.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from trainer.data import Dataset, Sample, load_dataset  # noqa: E402
from trainer.descriptions import descriptions_for, read_descriptions  # noqa: E402
from trainer.engine import TrainConfig, train_learner  # noqa: E402
from trainer.evaluate import evaluate  # noqa: E402
from trainer.features import encode_samples  # noqa: E402
from trainer.fewshot import sample_few_shot  # noqa: E402
from trainer.methods import build_learner, make_config  # noqa: E402
from trainer.world.dataset import write_imagefolder  # noqa: E402
from trainer.world.families import STYLES, family_classnames  # noqa: E402


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


def mean_std(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{statistics.mean(values):.1f}"


@dataclass(frozen=True)
class Outcome:
    top1: float
    bundle_bytes: int
    parameters: int
    seconds: float


def train_bundle(method: str, backbone: Backbone, dataset: Dataset, seed: int, args: argparse.Namespace,
                 descriptions: bool = True) -> tuple[Bundle, int]:
    samples = sample_few_shot(dataset.split("train"), args.shots, seed)
    if method == "coop":
        learner = build_learner("coop", make_config("coop", n_ctx=4), backbone, dataset.classnames)
        data = encode_samples(backbone, samples, seed=seed)
        cfg = TrainConfig(epochs=args.coop_epochs, optimizer="sgd", lr=0.02, seed=seed)
    else:
        options = {"category_queries": args.category_queries, "content_queries": args.content_queries}
        learner = build_learner("tgpt", make_config("tgpt", **options), backbone, dataset.classnames)
        table = read_descriptions(dataset.split("train")[0].path.parents[1] / "descriptions.tsv")
        texts = descriptions_for(samples, table) if descriptions else [None] * len(samples)
        data = learner.training_set(samples, texts, views=1, seed=seed, progress=False)
        cfg = TrainConfig(epochs=args.tgpt_epochs, batch_size=8, optimizer="adamw", lr=args.tgpt_lr,
                          weight_decay=1e-4, adam_eps=1e-7, warmup_steps=args.warmup_steps, seed=seed)
    train_learner(learner, data, cfg)
    return Bundle(*learner.export()), learner.trainable_parameters()


def run(row: str, backbone: Backbone, dataset: Dataset, seed: int, args: argparse.Namespace) -> Outcome:
    start = time.perf_counter()
    if row == "zero-shot CLIP":
        bundle, parameters = zero_shot_bundle(backbone, dataset.classnames), 0
    else:
        method = "coop" if row == "CoOp" else "tgpt"
        bundle, parameters = train_bundle(method, backbone, dataset, seed, args, row != "TGP-T, no descriptions")
    seconds = time.perf_counter() - start
    top1 = evaluate(bundle, backbone, dataset.split("test")).top1
    return Outcome(top1, len(encode_bundle(bundle.manifest, bundle.tensors)), parameters, seconds)


ROWS = ("zero-shot CLIP", "CoOp", "TGP-T", "TGP-T, no descriptions")


def table(rows: dict[str, list[Outcome]]) -> str:
    lines = ["| method | top-1 % | bundle bytes | trainable params | train time (s) |", "|---|---|---|---|---|"]
    for name, outcomes in rows.items():
        lines.append(f"| {name} | {mean_std([o.top1 for o in outcomes])} | {outcomes[0].bundle_bytes} "
                     f"| {outcomes[0].parameters} | {statistics.mean(o.seconds for o in outcomes):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1")
    parser.add_argument("--families", nargs="+", default=["shape", "shape-code"])
    parser.add_argument("--style", default="faint", choices=STYLES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--coop-epochs", type=int, default=50)
    parser.add_argument("--tgpt-epochs", type=int, default=10)
    parser.add_argument("--tgpt-lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--category-queries", type=int, default=12)
    parser.add_argument("--content-queries", type=int, default=24)
    parser.add_argument("--train-per-class", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=25)
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--data", default="var/world-data")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backbone = load_backbone(BackboneSpec(args.model, args.pretrained or None, device="cpu"))
    size = backbone.model.visual.image_size[0]
    started, sections = time.perf_counter(), []
    for family in args.families:
        dataset = world_dataset(Path(args.data), family, args.style, args.train_per_class, args.test_per_class, size)
        rows = {}
        for name in args.rows:
            rows[name] = [run(name, backbone, dataset, seed, args) for seed in args.seeds]
            print(f"{family:>10} {name:<24} {mean_std([o.top1 for o in rows[name]])}", flush=True)
        sections.append(f"### Family: {family} ({len(dataset.classnames)} classes)\n\n{table(rows)}")
    report = "\n\n".join([
        f"## TGP-T on the procedural world ({args.model}, pretrained {args.pretrained}, {args.style} images)",
        f"{args.shots} shots per class, seeds {', '.join(map(str, args.seeds))}; CoOp {args.coop_epochs} epochs "
        f"(SGD lr 0.02), TGP-T {args.tgpt_epochs} epochs (AdamW lr {args.tgpt_lr}, eps 1e-7, wd 1e-4, batch 8, "
        f"{args.warmup_steps} warm-up steps, {args.category_queries}/{args.content_queries} queries); "
        f"top-1 in %, mean ± std. Total wall time {time.perf_counter() - started:.0f} s on {backbone.device}.\n\n"
        f"Command: `python bench/tgpt_world.py {' '.join(sys.argv[1:])}`",
        *sections,
    ])
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
