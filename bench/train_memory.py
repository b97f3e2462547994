"""Peak memory of one training step, CoOp vs TGP-T, at 10, 100 and 1000 classes on the same backbone.

    python bench/train_memory.py --model promptserve-tiny --pretrained world-v1
    python bench/train_memory.py --model ViT-B-16 --classes 10 100 --category-queries 32 --content-queries 64

CoOp pushes every class prompt through the text tower with gradients each step, so its step grows with
the class count; TGP-T pushes two prompts per image whatever the class count (plus the per-class head).
Each case runs in a fresh subprocess from cached image outputs (both methods leave the image tower
frozen). Two measures per case:
- peak: CPU, the step's peak resident memory above the resident memory just before it (the kernel's
  high-water mark is reset through /proc/self/clear_refs after freeing and trimming the heap), median of
  `--repeats` fresh processes (the allocator makes single readings noisy at small sizes); CUDA (when
  available), `torch.cuda.max_memory_allocated` above the allocation before the step.
- saved: bytes autograd keeps for backward (distinct storages, the frozen weights excluded), counted by
  a saved-tensors hook: deterministic, and the part that grows with CoOp's class count.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from service.core.backbone import BackboneSpec, load_backbone  # noqa: E402
from trainer.engine import TrainConfig, make_optimizer  # noqa: E402
from trainer.methods import build_learner, make_config  # noqa: E402
from trainer.methods.tgpt import TokenBatch  # noqa: E402


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Trim freed heap back to the OS, reset the high-water mark; returns resident kB now."""
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _inputs(method: str, learner, backbone, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(learner.classnames), (batch,), generator=g).to(device)
    dim = backbone.model.visual.output_dim
    if method == "coop":
        return F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device), labels
    visual = backbone.model.visual
    n_tokens = (visual.image_size[0] // visual.patch_size[0]) * (visual.image_size[1] // visual.patch_size[1]) + 1
    targets = torch.randint(0, backbone.text.tower.token_embedding.weight.shape[0],
                            (batch, learner.config.content_queries), generator=g)
    return TokenBatch(torch.randn(batch, n_tokens, dim, generator=g).to(device),
                      torch.randn(batch, dim, generator=g).to(device), targets.to(device)), labels


def measure(args: argparse.Namespace) -> dict:
    """One case, in this process: build, then measure exactly one optimizer step."""
    torch.set_num_threads(args.threads)
    backbone = load_backbone(BackboneSpec(args.model, args.pretrained, device=args.device))
    classnames = tuple(f"class {i}" for i in range(args.n_classes))
    options = {"coop": {"n_ctx": 4}, "tgpt": {"category_queries": args.category_queries,
                                              "content_queries": args.content_queries}}[args.case]
    learner = build_learner(args.case, make_config(args.case, **options), backbone, classnames).to(backbone.device)
    learner.train()
    inputs, labels = _inputs(args.case, learner, backbone, args.batch_size, backbone.device)
    optimizer = make_optimizer([p for p in learner.parameters() if p.requires_grad],
                               TrainConfig(optimizer="adamw", lr=1e-4))
    cuda = backbone.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak()
    frozen = {t.untyped_storage().data_ptr() for t in [*backbone.model.parameters(), *backbone.model.buffers(),
                                                      *learner.parameters(), *learner.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = learner.loss(inputs, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mib = (_status_kb("VmHWM") - before) / 1024
    return {"case": args.case, "classes": args.n_classes, "device": str(backbone.device), "peak_mib": peak_mib,
            "saved_mib": sum(saved.values()) / 2**20, "trainable": learner.trainable_parameters()}


def run_case(args: argparse.Namespace, case: str, n_classes: int, device: str) -> dict:
    """The case in `--repeats` fresh processes: the median peak, the (deterministic) saved bytes."""
    runs = [_run_once(args, case, n_classes, device) for _ in range(args.repeats)]
    return runs[0] | {"peak_mib": statistics.median(r["peak_mib"] for r in runs)}


def _run_once(args: argparse.Namespace, case: str, n_classes: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--one", case, str(n_classes), "--device", device, "--model", args.model,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--category-queries", str(args.category_queries), "--content-queries", str(args.content_queries)]
    if args.pretrained:
        cmd += ["--pretrained", args.pretrained]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="promptserve-tiny")
    parser.add_argument("--pretrained", default="world-v1", help="'' for seeded random weights")
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--batch-size", type=int, default=8, help="images per step, both methods")
    parser.add_argument("--category-queries", type=int, default=8)
    parser.add_argument("--content-queries", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case (median peak)")
    parser.add_argument("--device", default=None, help="internal: device of one case")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "CLASSES"), help="internal: measure one case")
    args = parser.parse_args()
    args.pretrained = args.pretrained or None
    if args.one:
        args.case, args.n_classes = args.one[0], int(args.one[1])
        print(json.dumps(measure(args)))
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"model {args.model} ({args.pretrained}), batch {args.batch_size}, TGP-T queries "
          f"{args.category_queries}/{args.content_queries}; peak MiB of one step above the state before it")
    print("| device | classes | CoOp peak MiB | TGP-T peak MiB | peak TGP-T / CoOp | CoOp saved MiB "
          "| TGP-T saved MiB | saved TGP-T / CoOp |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        for n in args.classes:
            coop, tgpt = run_case(args, "coop", n, device), run_case(args, "tgpt", n, device)
            print(f"| {device} | {n} | {coop['peak_mib']:.1f} | {tgpt['peak_mib']:.1f} "
                  f"| {tgpt['peak_mib'] / coop['peak_mib']:.2f} | {coop['saved_mib']:.1f} | {tgpt['saved_mib']:.1f} "
                  f"| {tgpt['saved_mib'] / coop['saved_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
