"""Base-to-novel and domain generalization on the procedural world: methods are rows, settings are sections.

    python bench/base_to_novel.py --out docs/base_to_novel.md

Each setting renders its images once and encodes them once (the image tower is frozen for every row here),
then each row trains from those cached features (16 shots per base class, one disjoint shot pool per
seed), is exported as a bundle, read back, and scored through the service's own text path
(`service.tasks.text_features`) on ≥ 200 held-out images per class. Base and novel are scored separately
(CoOp's split: first half of the classes base); HM is the papers' convention, HM(mean base, mean novel).
Differences against zero-shot and CoOp are paired over seeds (same test images, same shots), with 95 %
t-intervals: they measure shot-to-shot variation on a fixed test set.

A row is one entry of ROWS: a name → a function from the training shots to a classifier (a bundle, plus
an optional image-feature centre). A new method is one entry (`trained("maple", {...}, SGD)` once its
learner exists; a vision-side method also needs its own `Classifier.image_features`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1]))

from service.bundle.codec import Bundle, decode_bundle, encode_bundle  # noqa: E402
from service.bundle.manifest import build_manifest  # noqa: E402
from service.core.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from service.methods import METHODS  # noqa: E402
from service.serving.text_features import text_features  # noqa: E402
from trainer.engine import TrainConfig, train_learner  # noqa: E402
from trainer.features import FeatureSet  # noqa: E402
from trainer.fewshot import base_novel_split  # noqa: E402
from trainer.methods import build_learner, make_config  # noqa: E402
from trainer.metrics import harmonic_mean  # noqa: E402
from trainer.world.dataset import family_specs, render_pool  # noqa: E402
from trainer.world.families import FAMILIES  # noqa: E402
from trainer.world.weaken import write_weak_checkpoint  # noqa: E402

ZERO_SHOT_TEMPLATE = "a photo of a {}."
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# --- images, encoded once --------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Normalized clean-view features [N, D] and family labels [N] of one rendered split."""

    features: torch.Tensor
    labels: torch.Tensor

    def of_classes(self, labels: tuple[int, ...]) -> Images:
        """The images of `labels`, relabelled 0.. in that order."""
        index = torch.full((int(self.labels.max()) + 1,), -1)
        index[list(labels)] = torch.arange(len(labels))
        keep = index[self.labels] >= 0
        return Images(self.features[keep], index[self.labels[keep]])


@torch.no_grad()
def encode_split(backbone: Backbone, family: str, style: str, per_class: int, seed: int,
                 confound: bool = False) -> Images:
    specs = family_specs(family, per_class, seed, confound=confound)
    pool = render_pool([s for s, _ in specs], style, size=backbone.model.visual.image_size[0])
    chunks = [backbone.encode_images(torch.stack([backbone.preprocess(Image.fromarray(a)) for a in pool[i:i + 512]]))
              for i in range(0, len(pool), 512)]
    return Images(torch.cat(chunks), torch.tensor([label for _, label in specs]))


def shot_pool(train: Images, shots: int, run: int) -> FeatureSet:
    """Run `run`'s shots: images [run·shots, (run+1)·shots) of each class — disjoint across runs."""
    picks = [torch.nonzero(train.labels == c).flatten()[run * shots:(run + 1) * shots]
             for c in range(int(train.labels.max()) + 1)]
    idx = torch.cat(picks)
    return FeatureSet(train.features[idx][:, None], train.labels[idx])


# --- rows: name → how to fit a classifier from shots -------------------------------------------------


@dataclass(frozen=True)
class Shots:
    backbone: Backbone
    classnames: tuple[str, ...]
    data: FeatureSet
    seed: int
    epochs: int


@dataclass(frozen=True)
class Classifier:
    """A bundle (scored as the service scores it) and, for the centring control, an image-feature centre."""

    bundle: Bundle
    centre: torch.Tensor | None = None
    parameters: int = 0

    def image_features(self, images: Images) -> torch.Tensor:
        if self.centre is None:
            return images.features
        return F.normalize(images.features - self.centre, dim=-1)

    def accuracy(self, backbone: Backbone, images: Images, classnames: tuple[str, ...]) -> float:
        classes = text_features(self.bundle.with_classnames(classnames), backbone)
        predictions = (self.image_features(images) @ classes.T).argmax(dim=-1)
        return 100.0 * (predictions == images.labels).float().mean().item()

    @property
    def bundle_bytes(self) -> int:
        return len(encode_bundle(self.bundle.manifest, self.bundle.tensors))


Row = Callable[[Shots], Classifier]


def zero_shot_bundle(backbone: Backbone, classnames: tuple[str, ...]) -> Bundle:
    return Bundle(build_manifest("zeroshot", backbone, classnames, options={"templates": [ZERO_SHOT_TEMPLATE]}), {})


def zero_shot(shots: Shots) -> Classifier:
    return Classifier(zero_shot_bundle(shots.backbone, shots.classnames))


def centring(shots: Shots) -> Classifier:
    """Training-free control: zero-shot text features, image features centred on the shots' mean feature."""
    return Classifier(zero_shot_bundle(shots.backbone, shots.classnames), shots.data.features[:, 0].mean(dim=0))


def trained(method: str, options: dict[str, Any], train: dict[str, Any]) -> Row:
    """A trainer method: train from the cached shots, export, read the bundle back as the service would."""

    def fit(shots: Shots) -> Classifier:
        seeded = {"init_seed": shots.seed} if "init_seed" in {f.name for f in dataclasses.fields(
            METHODS[method].config)} else {}  # a random init follows the run seed, as in the CLI
        learner = build_learner(method, make_config(method, **options, **seeded), shots.backbone, shots.classnames)
        train_learner(learner, shots.data, TrainConfig(**{"epochs": shots.epochs, "seed": shots.seed, **train}))
        return Classifier(decode_bundle(encode_bundle(*learner.export())), parameters=learner.trainable_parameters())

    return fit


# CoOp's recipe family (SGD momentum 0.9, cosine, 1 warm-up epoch at 1e-5) for every trained row, at 10× CoOp's
# ImageNet lr (0.002 leaves the tiny model's prompt where it started in 200 steps). RLP's A starts at 0 and
# B at 1/sqrt(d), so its update A·B moves ~10× slower per step than a free ctx: it takes 10× the lr.
SGD = {"optimizer": "sgd", "lr": 0.02}
RLP_SGD = {"optimizer": "sgd", "lr": 0.2}
ROWS: dict[str, Row] = {
    "zero-shot CLIP": zero_shot,
    "centring control": centring,
    "CoOp": trained("coop", {"n_ctx": 4}, SGD),
    "QCoOp 1-bit": trained("qprompt", {"n_ctx": 4, "bits": 1}, SGD),
    "QCoOp 2-bit": trained("qprompt", {"n_ctx": 4, "bits": 2}, SGD),
    "QCoOp 4-bit": trained("qprompt", {"n_ctx": 4, "bits": 4}, SGD),
    "RLP (rank 1)": trained("rlp", {"n_ctx": 4, "rank": 1}, RLP_SGD),
}


# --- settings ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A family rendered in one style on one checkpoint; `confound` gives each class's shots fixed nuisances."""

    title: str
    family: str
    style: str
    checkpoint: str  # "world-v1" or "weak"
    confound: bool = False


SETTINGS: dict[str, Setting] = {
    "spurious": Setting("shape, confounded shots (photo, weak checkpoint)", "shape", "photo", "weak", confound=True),
    "spurious-v1": Setting("shape, confounded shots (photo, world-v1)", "shape", "photo", "world-v1", confound=True),
    "composite": Setting("composite colour × shape (photo, weak checkpoint)", "composite", "photo", "weak"),
    "shape-weak": Setting("shape (photo, weak checkpoint)", "shape", "photo", "weak"),
    "colour-weak": Setting("colour (photo, weak checkpoint)", "colour", "photo", "weak"),
    "shape-faint": Setting("shape (faint, world-v1)", "shape", "faint", "world-v1"),
    "colour-faint": Setting("colour (faint, world-v1) — a style correction", "colour", "faint", "world-v1"),
}
DG_STYLES = ("faint", "outline", "noisy", "photo")


@dataclass
class Runs:
    """Per-seed outcomes of one row in one setting."""

    scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    seconds: list[float] = dataclasses.field(default_factory=list)
    bundle_bytes: int = 0
    payload_bytes: int = 0
    parameters: int = 0

    def add(self, key: str, value: float) -> None:
        self.scores.setdefault(key, []).append(value)


def fit_row(row: Row, shots: Shots, runs: Runs) -> Classifier:
    start = time.perf_counter()
    classifier = row(shots)
    runs.seconds.append(time.perf_counter() - start)
    runs.bundle_bytes, runs.payload_bytes = classifier.bundle_bytes, classifier.bundle.payload_bytes
    runs.parameters = classifier.parameters
    return classifier


def base_to_novel(setting: Setting, backbone: Backbone, rows: list[str], args: argparse.Namespace) -> dict[str, Runs]:
    names = tuple(FAMILIES[setting.family])
    base, novel = base_novel_split(names)
    train = encode_split(backbone, setting.family, setting.style, args.shots * len(args.seeds), seed=1,
                         confound=setting.confound).of_classes(base.labels)
    test = encode_split(backbone, setting.family, setting.style, args.test_per_class, seed=2)
    base_test, novel_test = test.of_classes(base.labels), test.of_classes(novel.labels)
    out = {name: Runs() for name in rows}
    for run, seed in enumerate(args.seeds):
        shots = Shots(backbone, base.classnames, shot_pool(train, args.shots, run), seed, args.epochs)
        for name in rows:
            classifier = fit_row(ROWS[name], shots, out[name])
            out[name].add("base", classifier.accuracy(backbone, base_test, base.classnames))
            out[name].add("novel", classifier.accuracy(backbone, novel_test, novel.classnames))
            out[name].add("hm", harmonic_mean(out[name].scores["base"][-1], out[name].scores["novel"][-1]))
    return out


def domain_generalization(family: str, backbone: Backbone, rows: list[str], args: argparse.Namespace
                          ) -> dict[str, Runs]:
    """Train on every class in `faint`, test the same classes in each style of DG_STYLES."""
    names = tuple(FAMILIES[family])
    train = encode_split(backbone, family, DG_STYLES[0], args.shots * len(args.seeds), seed=1)
    tests = {style: encode_split(backbone, family, style, args.test_per_class, seed=2) for style in DG_STYLES}
    out = {name: Runs() for name in rows}
    for run, seed in enumerate(args.seeds):
        shots = Shots(backbone, names, shot_pool(train, args.shots, run), seed, args.epochs)
        for name in rows:
            classifier = fit_row(ROWS[name], shots, out[name])
            for style, images in tests.items():
                out[name].add(style, classifier.accuracy(backbone, images, names))
    return out


# --- statistics and tables ---------------------------------------------------------------------------


def paired_ci(values: list[float], reference: list[float]) -> str:
    """Mean of the per-seed differences with its 95 % t-interval."""
    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f}"
    half = T_975.get(len(diffs) - 1, 2.228) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def b2n_table(result: dict[str, Runs]) -> str:
    zs, coop = result.get("zero-shot CLIP"), result.get("CoOp")
    lines = ["| method | Base | Novel | HM | ΔBase vs ZS | ΔNovel vs ZS | ΔNovel vs CoOp | ΔHM vs ZS | ΔHM vs CoOp "
             "| payload B | params | s/run |", "|" + "---|" * 12]
    for name, runs in result.items():
        s = runs.scores
        base, novel = statistics.mean(s["base"]), statistics.mean(s["novel"])
        lines.append(
            f"| {name} | {base:.1f} | {novel:.1f} | {harmonic_mean(base, novel):.1f} "
            f"| {_vs(s, zs, 'base')} | {_vs(s, zs, 'novel')} | {_vs(s, coop, 'novel')} | {_vs(s, zs, 'hm')} "
            f"| {_vs(s, coop, 'hm')} | {runs.payload_bytes} | {runs.parameters} "
            f"| {statistics.mean(runs.seconds):.1f} |")
    return "\n".join(lines)


def _vs(scores: dict[str, list[float]], reference: Runs | None, key: str) -> str:
    if reference is None or reference.scores is scores:
        return "—"
    return paired_ci(scores[key], reference.scores[key])


def dg_table(result: dict[str, Runs]) -> str:
    zs, coop = result.get("zero-shot CLIP"), result.get("CoOp")
    head = " | ".join(f"{s}{' (source)' if s == DG_STYLES[0] else ''}" for s in DG_STYLES)
    lines = [f"| method | {head} | Δ vs ZS, {' / '.join(DG_STYLES[1:])} | Δ vs CoOp, {' / '.join(DG_STYLES[1:])} |",
             "|" + "---|" * (len(DG_STYLES) + 3)]
    for name, runs in result.items():
        s = runs.scores
        means = " | ".join(f"{statistics.mean(s[st]):.1f}" for st in DG_STYLES)
        vs_zs = "; ".join(_vs(s, zs, st) for st in DG_STYLES[1:])
        vs_coop = "; ".join(_vs(s, coop, st) for st in DG_STYLES[1:])
        lines.append(f"| {name} | {means} | {vs_zs} | {vs_coop} |")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------


def backbones(args: argparse.Namespace, needed: set[str]) -> dict[str, Backbone]:
    world = load_backbone(BackboneSpec(args.model, args.pretrained, device="cpu"))
    out = {"world-v1": world}
    if "weak" in needed:
        path = write_weak_checkpoint(Path(args.data) / f"weak-{args.model}-a{args.weak_alpha:.2f}.safetensors",
                                     world.model, args.model, args.weak_alpha)
        out["weak"] = load_backbone(BackboneSpec(args.model, str(path), device="cpu"))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--dg-families", nargs="*", default=["shape"], choices=list(FAMILIES),
                        help="domain generalization: train faint (all classes), test faint/outline/noisy/photo")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--weak-alpha", type=float, default=0.3, help="weak checkpoint: share of a random init")
    parser.add_argument("--data", default="var/world-bench", help="where the weak checkpoint is written")
    parser.add_argument("--threads", type=int, default=1, help="2 threads on 2 shared cores ran 10× slower")
    parser.add_argument("--out", help="write the Markdown report here (default: print only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models = backbones(args, {SETTINGS[s].checkpoint for s in args.settings})
    sections = []
    for key in args.settings:
        setting = SETTINGS[key]
        result = base_to_novel(setting, models[setting.checkpoint], args.rows, args)
        n = len(FAMILIES[setting.family])
        sections.append(f"### {setting.title}: {n} classes, {math.ceil(n / 2)} base\n\n{b2n_table(result)}")
        print(sections[-1], flush=True)
    for family in args.dg_families:
        result = domain_generalization(family, models["world-v1"], args.rows, args)
        sections.append(f"### Domain generalization, {family} ({len(FAMILIES[family])} classes, all trained): "
                        f"train faint, test each style (world-v1)\n\n{dg_table(result)}")
        print(sections[-1], flush=True)
    report = "\n\n".join([
        f"## Base-to-novel and domain generalization on the procedural world ({args.model})",
        f"{args.shots} shots per trained class, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}) with "
        f"disjoint shot pools, {args.epochs} epochs, {args.test_per_class} test images per class; accuracy in %. "
        "HM = HM(mean base, mean novel). Δ columns: mean paired difference over seeds [95 % t-interval]. "
        f"Weak checkpoint: world-v1 interpolated {args.weak_alpha:.2f} of the way to a random init. "
        f"Total wall time {time.perf_counter() - started:.0f} s on cpu ({args.threads} threads, shared machine).",
        f"Command: `PYTHONPATH=. python bench/base_to_novel.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        *sections,
    ])
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
