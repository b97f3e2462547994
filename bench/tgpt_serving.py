"""Serving cost of TGP-T per image per task, relative to the shared image forward, measured in one run.

    python bench/tgpt_serving.py --model promptserve-tiny --pretrained world-v1 --queries 8 24
    python bench/tgpt_serving.py --model ViT-B-16 --pretrained '' --queries 32 64 --batch 8

For a micro-batch of B images: the shared image forward (`Backbone.encode_image_tokens`: pooled features +
tokens), then `group_logits` for B rows of 1 task and of 2 tasks (2B rows: still two text calls). Timings are the
median of `--repeats` interleaved runs; the ratio (TGP-T time per task / image-forward time) is what to
read, since the machine's load moves both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

from service.core.backbone import BackboneSpec, load_backbone  # noqa: E402
from service.core.bonder import TGPTDims, TGPTModel, group_logits  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1", help="'' for seeded random weights")
    parser.add_argument("--queries", nargs=2, type=int, default=[8, 24], metavar=("CATEGORY", "CONTENT"))
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(BackboneSpec(args.model, args.pretrained or None, device="cpu"))
    visual = backbone.model.visual
    dims = TGPTDims(*args.queries, backbone.text.width, visual.output_dim)
    models = [TGPTModel(dims, args.classes).eval() for _ in range(2)]
    pixels = torch.randn(args.batch, 3, *visual.image_size)
    out = backbone.encode_image_tokens(pixels)
    cases = {"image forward": lambda: backbone.encode_image_tokens(pixels),
             "1 TGP-T task": lambda: group_logits(backbone.text, models[:1], [out.tokens], [out.pooled]),
             "2 TGP-T tasks": lambda: group_logits(backbone.text, models, [out.tokens] * 2, [out.pooled] * 2)}
    for fn in cases.values():
        fn()  # warm-up
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["image forward"]
    print(f"{args.model} ({args.pretrained or 'random'}), batch {args.batch}, queries {args.queries}, "
          f"{args.classes} classes, {args.threads} threads, median of {args.repeats}")
    print("| step | ms per image | × image forward | × image forward per task |")
    print("|---|---|---|---|")
    for name, tasks in (("image forward", 1), ("1 TGP-T task", 1), ("2 TGP-T tasks", 2)):
        t = median[name]
        print(f"| {name} | {1000 * t / args.batch:.2f} | {t / base:.3f} | {t / base / tasks:.3f} |")


if __name__ == "__main__":
    main()
