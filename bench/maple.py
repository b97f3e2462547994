"""MaPLe / QMaPLe: bundle sizes beside the paper's, and seconds per training step on this machine's CPU.

    python bench/maple.py --out docs/maple_bench.md

Sizes are measured on real exported bundles (random-weight ViT-B/16 and the embedded tiny CLIP; sizes do
not depend on the weights). The full form counts what a MaPLe checkpoint holds (text prompts + coupling
Linear layers); the merged bundle is what `promptserve` stores. Step times are the median of a few steps
(SGD, image tower forward and backward, cross-entropy over C classes), beside the CoOp step from cached
image features and the plain no-grad image forward measured in the same run.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))

from service.bundle.codec import encode_bundle  # noqa: E402
from service.core.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from trainer.methods import build_learner, make_config  # noqa: E402

PAPER_KB = {"MaPLe": 7096, "QMaPLe 4-bit": 1774}  # QPrompt paper, ViT-B/16 (KB = 1000 bytes)
BACKBONES = {"ViT-B/16": ("ViT-B-16", None), "tiny CLIP": ("promptserve-tiny", "world-v1")}


def classnames(count: int) -> tuple[str, ...]:
    return tuple(f"class {i}" for i in range(count))


def size_rows(name: str, backbone: Backbone) -> list[str]:
    maple = build_learner("maple", make_config("maple"), backbone, classnames(2))
    qmaple = build_learner("qmaple", make_config("qmaple", bits=4), backbone, classnames(2))
    values = maple.full_form_values()
    no_bias = values["prompts"] + values["coupling_weights"]
    bundle = {m: len(encode_bundle(*learner.export())) for m, learner in (("maple", maple), ("qmaple", qmaple))}
    payload = {m: sum(t.numel() * t.element_size() for t in learner.export_tensors().values())
               for m, learner in (("maple", maple), ("qmaple", qmaple))}
    depth, n = maple.depth, maple.config.n_ctx
    label = f"{name} (J {depth}, n {n})"
    paper = name == "ViT-B/16"
    return [
        f"| {label} | MaPLe | {no_bias:,} (+{values['coupling_biases']:,} biases) | {no_bias * 2:,} "
        f"| {PAPER_KB['MaPLe'] if paper else '–'} | {payload['maple']:,} | {bundle['maple']:,} |",
        f"| {label} | QMaPLe 4-bit | {no_bias:,} (+{values['coupling_biases']:,} biases) | {no_bias // 2:,} "
        f"| {PAPER_KB['QMaPLe 4-bit'] if paper else '–'} | {payload['qmaple']:,} | {bundle['qmaple']:,} |",
    ]


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(learner, pixels: torch.Tensor | None, features: torch.Tensor | None, labels: torch.Tensor):
    optimizer = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step() -> None:
        image = learner.image_features(pixels) if features is None else features
        loss = F.cross_entropy(learner(image), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.after_step()

    return step


def timing_row(name: str, backbone: Backbone, batch: int, n_classes: int, repeats: int) -> str:
    size = backbone.model.visual.image_size
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(batch) % n_classes
    names = classnames(n_classes)
    with torch.no_grad():
        cached = backbone.encode_images(pixels)
    plain = median_seconds(lambda: backbone.encode_images(pixels), repeats)
    coop = median_seconds(train_step(build_learner("coop", make_config("coop"), backbone, names), None, cached,
                                     labels), repeats)
    timed = {m: median_seconds(train_step(build_learner(m, make_config(m), backbone, names), pixels, None, labels),
                               repeats) for m in ("maple", "qmaple")}
    return (f"| {name} | {batch} | {n_classes} | {plain:.3f} | {coop:.3f} | {timed['maple']:.3f} "
            f"({timed['maple'] / coop:.1f}× CoOp) | {timed['qmaple']:.3f} ({timed['qmaple'] / timed['maple']:.2f}× "
            f"MaPLe) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--no-timing", dest="timing", action="store_false", help="sizes only")
    parser.add_argument("--out", help="write the Markdown tables here (default: print only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    sizes, steps = [], []
    for name in args.backbones:
        backbone = load_backbone(BackboneSpec(*BACKBONES[name], device="cpu"))
        sizes += size_rows(name, backbone)
        print(*sizes[-2:], sep="\n", flush=True)
        if args.timing:
            batch, n_classes = (4, 10) if name == "ViT-B/16" else (32, 8)
            steps.append(timing_row(name, backbone, batch, n_classes, args.repeats))
            print(steps[-1], flush=True)
    report = "\n".join([
        "| backbone | method | full-form values (no biases) | full form bytes (MaPLe fp16, QMaPLe 4-bit) | paper (KB) "
        "| merged payload bytes | merged bundle file bytes |",
        "|---|---|---|---|---|---|---|", *sizes, "",
        f"Seconds per training step ({torch.get_num_threads()} CPU threads, median of {args.repeats}):", "",
        "| backbone | batch | classes | plain image forward (no grad) | CoOp step (cached features) "
        "| MaPLe step | QMaPLe 4-bit step |",
        "|---|---|---|---|---|---|---|", *steps,
        "", f"Command: `python bench/maple.py {shlex.join(sys.argv[1:])}`",
    ])
    print("\n" + report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
