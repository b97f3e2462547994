"""TGP-T on the procedural world: few-shot accuracy against zero-shot CLIP, CoOp and baselines that need no
text-guided prompts (a zero-shot-initialised linear probe, its WiSE-FT blend, Tip-Adapter), on real and on coded
class names.

    PYTHONPATH=. python bench/tgpt_world.py --out docs/tgpt_world.md

Families: `shape` (real names) and `shape-code` — the very same images, with classes named "class-00" ...
"class-15", so the names say nothing and only the images (and, for TGP-T, the per-image descriptions: the
renderer's captions, "a faint photo of a small red star on the left ...") carry what the classes are. Each family
is written once in CoOp's layout and run through the reproduction harness's few-shot protocol
(`trainer.protocols.few_shot`): per seed, `--shots` images per class, every row fitted, exported (bundle rows)
and scored on held-out images. TGP-T runs its reference recipe (AdamW, linear warm-up, batch 8, a fresh random
resized crop + flip every step, the best epoch on a quarter of the shots held out) scaled to the tiny CLIP:
12/24 queries (its text context holds 32 tokens), fewer iterations at a higher lr (chosen on the validation
split: `--tune`), and the world's crop scale 0.8. "TGP-T, no descriptions" drops the content loss.
Differences are paired over seeds, with 95 % t-intervals; results are stored per unit (resumable).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.base_to_novel import WORLD_RECIPE, beats, ci_text, diffs, interval, write_report  # noqa: E402
from service.core.backbone import BackboneSpec, load_backbone  # noqa: E402
from service.methods import METHODS  # noqa: E402
from trainer import protocols  # noqa: E402
from trainer.configs import TrainConfig  # noqa: E402
from trainer.data import Dataset, load_coop  # noqa: E402
from trainer.descriptions import descriptions_for, read_descriptions  # noqa: E402
from trainer.world.dataset import write_coop  # noqa: E402

QUERIES = {"category_queries": 12, "content_queries": 24}  # the tiny CLIP's text context holds 32 tokens
TGPT_WORLD = {"iterations": 300, "lr": 2e-3, "warmup_steps": 10}  # the reference's 12,800 at 5e-5, scaled (--tune)
# name → (method, options, recipe overrides, trains on descriptions)
TRAINED: dict[str, tuple[str, dict[str, Any], dict[str, Any], bool]] = {
    "CoOp": ("coop", {}, {}, True),
    "CoOp (CSC)": ("coop", {"class_specific": True}, {}, True),
    "TGP-T": ("tgpt", QUERIES, TGPT_WORLD, True),
    "TGP-T, no descriptions": ("tgpt", QUERIES, TGPT_WORLD, False),
}
PROBE = {"lr": 1e-2, "steps": 100}  # the linear probe's recipe on this benchmark (--tune)
BASELINES = ("zero-shot CLIP", "linear probe (ZS init)", "WiSE-FT (probe ⊕ ZS, 0.5)", "Tip-Adapter")
ROW_NAMES = [*BASELINES, *TRAINED]


def rows(train: dict[str, Any]) -> dict[str, protocols.Row]:
    out = {name: protocols.BASELINE_ROWS[name] for name in BASELINES}
    out["linear probe (ZS init)"] = protocols.linear_probe(**PROBE)
    for name, (method, options, overrides, described) in TRAINED.items():
        out[name] = protocols.method_row(method, options, {**WORLD_RECIPE, **overrides, **train}, described)
    return out


TUNE_TGPT_LRS = (5e-5, 5e-4, 2e-3)  # the reference's lr first
TUNE_PROBE = tuple((lr, steps) for lr in (3e-4, 1e-3, 1e-2) for steps in (100, 300, 1000))


def tuning_rows() -> dict[str, protocols.Row]:
    """`--tune`: TGP-T's lr at the scaled length, and the linear probe's lr and length (the zero-shot init means
    nothing for coded names, so the probe gets its own chance here rather than the base-to-novel choice)."""
    out: dict[str, protocols.Row] = {"zero-shot CLIP": protocols.zero_shot_row}
    for lr in TUNE_TGPT_LRS:
        out[f"TGP-T, lr {lr:g}"] = protocols.method_row("tgpt", QUERIES, {**WORLD_RECIPE, **TGPT_WORLD, "lr": lr})
    for lr, steps in TUNE_PROBE:
        out[f"linear probe, lr {lr:g}, {steps} steps"] = protocols.linear_probe(lr, steps)
    return out


def world_dataset(root: Path, family: str, args: argparse.Namespace, size: int) -> protocols.Task:
    folder = root / f"{family}-{args.style}-{size}px-{args.train_per_class}-{args.test_per_class}"
    if not (folder / "descriptions.tsv").is_file():
        write_coop(folder, family, {"train": args.train_per_class, "val": 25, "test": args.test_per_class},
                   style=args.style, size=size)
    data = load_coop(folder)
    data = Dataset(data.name, data.classnames, {**data.splits, "test": data.split(args.split)})
    table = read_descriptions(folder / "descriptions.tsv")
    return protocols.Task(family, data, descriptions=lambda samples: descriptions_for(samples, table))


def table(result: dict[str, list[dict[str, Any]]]) -> str:
    zs, tgpt = result.get("zero-shot CLIP"), result.get("TGP-T")
    lines = ["| method | top-1 % | Δ vs ZS | Δ vs TGP-T | payload B | trainable params | s/run | scored |",
             "|---|---|---|---|---|---|---|---|"]
    for name, units in result.items():
        top1 = [u["top1"] for u in units]
        spread = f" ± {statistics.stdev(top1):.1f}" if len(top1) > 1 else ""
        lines.append(f"| {name} | {statistics.mean(top1):.1f}{spread} | {_vs(units, zs)} | {_vs(units, tgpt)} "
                     f"| {units[0]['payload_bytes']} | {units[0]['parameters']} "
                     f"| {statistics.mean(u['seconds'] for u in units):.1f} "
                     f"| {protocols.scored(name, units[0])} |")
    return "\n".join(lines)


def _vs(units: list[dict[str, Any]], reference: list[dict[str, Any]] | None) -> str:
    return "—" if reference is None or reference is units else ci_text(diffs(units, reference, "top1"))


def verdict(result: dict[str, list[dict[str, Any]]]) -> str:
    """What the section tells apart: TGP-T against zero-shot, against the baselines, with and without descriptions."""
    everyone = list(result)
    lines = [f"- **Beat zero-shot (95 % CI above 0):** {_names(beats(result, 'zero-shot CLIP', 'top1', everyone))}."]
    if "TGP-T" in result:
        lines.append(f"- **TGP-T beats:** {_names(beaten_by(result, 'TGP-T'))}.")
        lines.append(f"- **Beat TGP-T:** {_names(beats(result, 'TGP-T', 'top1', everyone))}.")
    if {"TGP-T", "TGP-T, no descriptions"} <= set(result):
        gain = ci_text(diffs(result["TGP-T"], result["TGP-T, no descriptions"], "top1"))
        lines.append(f"- **What the descriptions add (TGP-T − no descriptions):** {gain}.")
    return "\n".join(lines)


def beaten_by(result: dict[str, list[dict[str, Any]]], name: str) -> list[str]:
    """The rows `name` beats: its paired difference to them has a 95 % interval above 0."""
    return [n for n in result if n != name and interval(diffs(result[name], result[n], "top1"))[1] > 0]


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "none (no interval excludes 0)"


def recipe_hash(args: argparse.Namespace) -> str:
    """What stored results depend on: the rows' recipes as the specs define them now, or the tuning candidates."""
    if args.tune:
        candidates = {"tgpt": [TUNE_TGPT_LRS, {k: v for k, v in TGPT_WORLD.items() if k != "lr"}, QUERIES],
                      "probe": TUNE_PROBE}
        facts: dict[str, Any] = {"tune": candidates, "world": WORLD_RECIPE, "shots": args.shots,
                                 "recipes": {m: dict(s.train_defaults) for m, s in METHODS.items()}}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    facts = {"trained": TRAINED, "probe": PROBE, "world": WORLD_RECIPE, "train": args.train, "shots": args.shots,
             "split": args.split, "recipes": {m: dict(s.train_defaults) for m, s in METHODS.items()},
             "defaults": asdict(TrainConfig()), "baseline_views": protocols.BASELINE_VIEWS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1")
    parser.add_argument("--families", nargs="+", default=["shape", "shape-code"])
    parser.add_argument("--style", default="faint")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--rows", nargs="+", default=ROW_NAMES, choices=ROW_NAMES)
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--tune", action="store_true", help="TGP-T's lr on the val split (shape-code, seeds 1 2)")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for trained rows")
    parser.add_argument("--data", default="var/world-data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.train = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.train)}
    if args.tune:
        args.split, args.seeds, args.families = "val", args.seeds[:2], ["shape-code"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(BackboneSpec(args.model, args.pretrained or None, device="cpu"))
    size = backbone.model.visual.image_size[0]
    started, sections, compute = time.perf_counter(), [], 0.0
    table_rows = tuning_rows() if args.tune else {n: r for n, r in rows(args.train).items() if n in args.rows}
    runs = Path(args.data) / "runs" / recipe_hash(args)
    for family in args.families:
        task = world_dataset(Path(args.data), family, args, size)
        result = protocols.few_shot(task, backbone, table_rows, args.seeds, [args.shots],
                                    protocols.Store(runs / family, backbone))[args.shots]
        compute += sum(u["seconds"] for units in result.values() for u in units)
        sections.append(f"### Family: {family} ({len(task.dataset.classnames)} classes)\n\n{table(result)}\n\n"
                        f"{verdict(result)}")
        print(sections[-1], flush=True)
    report = "\n\n".join([
        f"## TGP-T on the procedural world ({args.model}, pretrained {args.pretrained}, {args.style} images)",
        f"{args.shots} shots per class, seeds {', '.join(map(str, args.seeds))}, "
        f"{25 if args.split == 'val' else args.test_per_class} {args.split} images per class; top-1 in %, mean ± std; "
        "Δ: mean paired difference over seeds [95 % t-interval]. Recipes: each method's reference recipe, crop scale "
        f"{WORLD_RECIPE['crop_scale']}; TGP-T {TGPT_WORLD}, {QUERIES['category_queries']}/"
        f"{QUERIES['content_queries']} queries; linear probe {PROBE} (lr, full-batch steps)"
        f"{', ' + str(args.train) if args.train else ''}. Fitting the rows took "
        f"{compute:.0f} s summed over the stored units; this run's wall time {time.perf_counter() - started:.0f} s "
        f"on cpu ({args.threads} thread(s), shared machine).",
        f"Command: `PYTHONPATH=. python bench/tgpt_world.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        *sections,
    ])
    print("\n" + report)
    if args.out:
        write_report(Path(args.out), report, "bench/tgpt_world.py")


if __name__ == "__main__":
    main()
