"""Serving benchmark: every number is measured in this run, and every claim is a ratio against a baseline
measured in the same run.

    python bench/serving.py                       # ViT-B-32 shape, random weights, CPU, every image precision
    python bench/serving.py --quick               # the same end to end in short runs (checks the script)
    python bench/serving.py --model ViT-B-16 --device cuda

(a) bare image encoder images/s per backend and precision (torch fp32 and bf16, ONNX Runtime fp32 and int8)
    against the matmul roofline of that precision measured here (fp32, bf16, int8 via torch._int_mm);
(b) end-to-end HTTP classify images/s with N concurrent clients per backend and precision, each against the bare
    encoder of the same backend and precision measured right before and right after it, and a reduced precision's
    also against the fp32 bare encoder in the same minute; with the reduced encoder's agreement with fp32 (cosine,
    top-1), the server's batch-size histogram for the run (from /metrics) and the load generator's own CPU use;
(c) a naive pipeline that re-encodes the label prompts for every request (as Hugging Face's zero-shot
    pipeline does), against (b);
(d) activation time of a large task: open_clip's plain 77-token text path against ours;
(e) one task against ten tasks per image, over HTTP;
(f) peers on the same architecture and input, against our default's (b): the Hugging Face zero-shot pipeline per
    image and at batch 8 (random-weight CLIPModel), and infinity-emb over HTTP with the same clients. A peer that
    fails is a row saying why; every figure is also printed the moment it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench import infinity_peer  # noqa: E402
from bench.prometheus_text import bucket_counts, format_buckets, histogram_buckets, share_at_most  # noqa: E402
from bench.timing import ClientRun, Send, closed_loop, timed_rate, wait_until_answering  # noqa: E402
from service.bundle.codec import decode_bundle, encode_bundle  # noqa: E402
from service.bundle.manifest import build_manifest  # noqa: E402
from service.core.backbone import Backbone, BackboneSpec, load_backbone  # noqa: E402
from service.core.precision import cpu_flags, fast_precisions  # noqa: E402
from service.core.records import PromptLayout  # noqa: E402
from service.serving.text_features import text_features  # noqa: E402

TOKEN = "bench-token"
BATCH_HISTOGRAM = "promptserve_batch_rows"
WARMUP_S = 2.0
PEER_BATCH = 8
LABELS = [f"label {i}" for i in range(10)]


def progress(line: str) -> None:
    """Every figure as it is measured: a run that dies later still leaves what it had."""
    print(f"- {line}", flush=True)


@dataclass(frozen=True)
class Variant:
    """An image encoder configuration: the service's PROMPTSERVE_IMAGE_BACKEND and PROMPTSERVE_IMAGE_PRECISION."""

    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


def variants(device: str, precisions: list[str]) -> list[Variant]:
    """fp32 on both backends (the baseline), then each reduced precision on the backend that runs it."""
    if device != "cpu":
        return [Variant("torch", "auto")]  # CUDA: fp16
    runs_on = {"bf16": "torch", "int8": "onnx"}
    fp32 = [Variant("torch", "fp32"), Variant("onnx", "fp32")] if "fp32" in precisions else []
    return fp32 + [Variant(runs_on[p], p) for p in precisions if p in runs_on]


def default_variant(device: str) -> Variant:
    """What the service's `auto` backend and precision pick here, the check passing (service/core/backbone.py)."""
    if device != "cpu":
        return Variant("torch", "auto")
    fast = fast_precisions(cpu_flags())
    return Variant({"bf16": "torch"}.get(fast[0], "onnx"), fast[0]) if fast else Variant("onnx", "fp32")


FP32 = Variant("onnx", "fp32")  # the fp32 baseline every reduced precision is measured against


def matmul_peak(dtype: torch.dtype, seconds: float, device: str = "cpu") -> float:
    """Operations/s of a 2048³ matrix product: floats with `@`, int8 (int32 sums) with torch._int_mm."""
    if dtype == torch.int8:
        a, b = (torch.randint(-128, 128, (2048, 2048), dtype=torch.int8, device=device) for _ in range(2))
    else:
        a, b = (torch.randn(2048, 2048, dtype=dtype, device=device) for _ in range(2))

    def step() -> None:
        torch._int_mm(a, b) if dtype == torch.int8 else a @ b
        if device != "cpu":
            torch.cuda.synchronize()

    return timed_rate(step, 2 * 2048**3, seconds)


# The precisions whose matmul ceiling the run measures: the image encoder's on this device.
CEILINGS = {"cpu": (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)),
            "cuda": (("fp32", torch.float32), ("fp16", torch.float16))}


def image_flops(backbone) -> float:
    """FLOPs of one image forward. The fused eval-mode attention kernel is invisible to the counter, so
    count with it off (the arithmetic is the same)."""
    size = backbone.model.visual.image_size[0]
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone.model.visual(torch.randn(1, 3, size, size))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return counter.get_total_flops()


def sample_image_bytes(size: int) -> bytes:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def coop_bundle(backbone, classnames: list[str]) -> bytes:
    ctx = torch.randn(4, backbone.text.width, generator=torch.Generator().manual_seed(1)) * 0.02
    manifest = build_manifest("coop", backbone, classnames, prompt=PromptLayout(4, backbone.text.width))
    return encode_bundle(manifest, {"ctx": ctx})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args, workdir: str, variant: Variant) -> tuple[subprocess.Popen, str, dict]:
    """The service on `variant`; returns it with its URL and its /readyz backbone (the precision that serves)."""
    port = free_port()
    env = os.environ | {
        "PROMPTSERVE_MODEL": args.model, "PROMPTSERVE_PRETRAINED": "", "PROMPTSERVE_DEVICE": args.device,
        "PROMPTSERVE_REGISTRY": f"{workdir}/{variant.backend}-{variant.precision}/registry",
        "PROMPTSERVE_ADMIN_TOKEN": TOKEN, "PROMPTSERVE_DEMO": "false", "PROMPTSERVE_IMAGE_BACKEND": variant.backend,
        "PROMPTSERVE_IMAGE_PRECISION": variant.precision,
        "PROMPTSERVE_ONNX_CACHE_DIR": f"{workdir}/onnx",  # shared with the bench's own bare ONNX encoders
    }
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if wait_until_answering(process, f"{url}/readyz"):
        return process, url, httpx.get(f"{url}/readyz").json()["backbone"]
    process.kill()
    process.wait()
    raise RuntimeError(f"the service on {variant} did not start")


@dataclass(frozen=True)
class HttpFigure:
    run: ClientRun
    batches: dict[float, int] | None  # rows per micro-batch → batches during the measured run; None: no /metrics


async def scrape_batches(client: httpx.AsyncClient) -> dict[float, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return histogram_buckets(response.text, BATCH_HISTOGRAM)


def http_figure(url: str, send: Send, clients: int, seconds: float, histogram: bool = True) -> HttpFigure:
    """Warm up, then measure `clients` closed-loop clients; the batch histogram is the server's, for the measured
    part only (a scrape before and after it)."""
    async def measure() -> HttpFigure:
        limits = httpx.Limits(max_connections=clients + 1)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            await closed_loop(client, send, clients, min(WARMUP_S, seconds))
            before = await scrape_batches(client) if histogram else None
            run = await closed_loop(client, send, clients, seconds)
            after = await scrape_batches(client) if histogram else None
        return HttpFigure(run, bucket_counts(before, after) if histogram else None)

    return asyncio.run(measure())


def classify_request(path: str, params: list, image: bytes) -> Send:
    return lambda client: client.post(path, params=params, files=[("images", ("x.jpg", image, "image/jpeg"))])


@dataclass(frozen=True)
class Bracketed:
    """An HTTP figure with the bare encoders measured right before and right after it: its own variant's, and for a
    reduced precision also fp32's (the first of each pair is the variant's own)."""

    name: str
    variant: Variant
    figure: HttpFigure
    before: tuple[float, ...]
    after: tuple[float, ...]

    @property
    def rate(self) -> float:
        return self.figure.run.rate

    @property
    def bare(self) -> float:
        return (self.before[0] + self.after[0]) / 2

    @property
    def fp32_bare(self) -> float:
        """The fp32 baseline's bare encoder in the same minute (the variant's own when it is fp32)."""
        return (self.before[-1] + self.after[-1]) / 2

    @property
    def share_of_bare(self) -> float:
        return self.rate / self.bare


def bracket(bares: list[Callable[[], float]], variant: Variant,
            figures: list[tuple[str, Callable[[], HttpFigure]]]) -> tuple[tuple[float, ...], list[Bracketed]]:
    """The bare encoders, then each HTTP figure followed by the bare encoders again: every figure has bare
    measurements right before and right after it (those after also serve the next figure). Returns the first bare
    measurements too."""
    first = before = tuple(bare() for bare in bares)
    measured = []
    for name, figure in figures:
        result = figure()
        after = tuple(bare() for bare in bares)
        measured.append(Bracketed(name, variant, result, before, after))
        progress(f"{name}: {result.run.rate:.2f} img/s (bare before {' '.join(f'{x:.2f}' for x in before)}, after "
                 f"{' '.join(f'{x:.2f}' for x in after)})")
        before = after
    return first, measured


def naive_pipeline_rate(backbone, classnames: list[str], image: bytes, seconds: float) -> float:
    """Per request: tokenize and encode every label prompt at 77 tokens, encode the image, softmax."""
    prompts = [f"a photo of a {c}." for c in classnames]

    def one_request():
        with torch.no_grad():
            text = backbone.model.encode_text(backbone.tokenizer(prompts).to(backbone.device), normalize=True)
            pixels = backbone.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
            image_features = backbone.model.encode_image(pixels.to(backbone.device), normalize=True)
            (100 * image_features @ text.T).softmax(-1).cpu()

    return timed_rate(one_request, 1, seconds)


def plain_text_features(backbone, prompts: list[str]) -> torch.Tensor:
    """The unoptimized path: open_clip's encode_text on full 77-token sequences, in batches."""
    with torch.no_grad():
        return torch.cat([backbone.model.encode_text(backbone.tokenizer(prompts[i:i + 256]).to(backbone.device),
                                                     normalize=True).cpu() for i in range(0, len(prompts), 256)])


def activation_ratio(backbone, n_classes: int) -> tuple[float, float, float]:
    """A zero-shot task's text features both ways: same prompts, so the features must agree."""
    classnames = [f"object category number {i}" for i in range(n_classes)]
    manifest = build_manifest("zeroshot", backbone, classnames, options={"templates": ["a photo of a {}."]})
    bundle = decode_bundle(encode_bundle(manifest, {}))
    start = time.perf_counter()
    fast = text_features(bundle, backbone)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = plain_text_features(backbone, [f"a photo of a {c}." for c in classnames])
    plain_s = time.perf_counter() - start
    return plain_s, fast_s, float((fast - plain).abs().max())


@dataclass
class Encoders:
    """The bench's own bare encoders, one backbone per variant (each ran the service's startup check)."""

    args: argparse.Namespace
    torch_backbone: Backbone
    workdir: str
    backbones: dict[Variant, Backbone] = field(default_factory=dict)

    def backbone(self, variant: Variant) -> Backbone:
        if variant == Variant("torch", "fp32") or self.args.device != "cpu":
            return self.torch_backbone
        if variant not in self.backbones:
            self.backbones[variant] = load_backbone(BackboneSpec(
                self.args.model, device="cpu", image_backend=variant.backend, image_precision=variant.precision,
                onnx_cache_dir=f"{self.workdir}/onnx"))
        return self.backbones[variant]

    def bare(self, variant: Variant, batch: int | None = None) -> Callable[[], float]:
        """The bare image encoder of `variant` in this process, as a measurement to repeat."""
        backbone, batch = self.backbone(variant), batch or self.args.batch
        size = self.torch_backbone.model.visual.image_size[0]
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))

        def step() -> None:
            backbone.encode_images(pixels)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()

        step()  # once: sessions and allocators warm, so each repeat is measured hot without a warm-up of its own
        return lambda: timed_rate(step, batch, self.args.seconds, warmup=0)


@dataclass
class VariantResult:
    variant: Variant
    serving: str  # the precision the service reported in /readyz
    first_bare: tuple[float, ...] = ()
    figures: list[Bracketed] = field(default_factory=list)
    agreement: str = ""  # the bench's own startup check of this variant, against fp32
    failure: str | None = None


def agreement_note(backbone: Backbone) -> str:
    trials = backbone.precision_choice.trials
    if not trials:
        return ""
    a, trial = trials[-1].agreement, trials[-1]
    if a is None or not trial.serves:
        return f"fell back: {backbone.precision_choice.fallback}"
    return (f"cosine min {a.cosine_min:.4f} mean {a.cosine_mean:.5f}; top-1 {a.top1_decided:.1%} of "
            f"{a.decided} decided ({a.top1:.0%} of all {a.images})")


def serve_and_measure(args, variant: Variant, encoders: Encoders, image: bytes, workdir: str, rows: list
                      ) -> VariantResult:
    """Start the service on `variant`, publish the tasks, and measure its HTTP figures bracketed by bare ones.
    Appends the activation row (d) to `rows` for the fp32 baseline."""
    bench_backbone = encoders.backbone(variant)
    result = VariantResult(variant, "", agreement=agreement_note(bench_backbone))
    if variant.precision not in ("fp32", "auto") and bench_backbone.image_precision != variant.precision:
        result.failure = result.agreement
        return result
    process, url, readiness = start_service(args, workdir, variant)
    result.serving = readiness["image_precision"]
    try:
        if variant.precision not in ("fp32", "auto") and result.serving != variant.precision:
            result.failure = f"the service fell back: {readiness['image_precision_check']['fallback']}"
            return result
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
        for t in range(10):
            httpx.post(f"{url}/v1/tasks/t{t}/versions", content=coop_bundle(encoders.torch_backbone, LABELS),
                       headers=headers, timeout=600).raise_for_status()
        figures = [(f"(b) HTTP classify, {variant}, {args.clients} clients", "/v1/tasks/t0/classify", [])]
        if variant == FP32 or args.device != "cpu":
            big = [f"object category number {i}" for i in range(args.classes)]
            start = time.perf_counter()
            httpx.post(f"{url}/v1/tasks/big/versions", content=coop_bundle(encoders.torch_backbone, big),
                       headers=headers, timeout=600).raise_for_status()
            rows.append((f"(d) HTTP upload+activation, {args.classes} classes, {variant}",
                         f"{time.perf_counter() - start:.2f} s", ""))
            progress(f"{rows[-1][0]}: {rows[-1][1]}")
            figures += [(f"(e) HTTP, ten tasks per image, {variant}", "/v1/classify",
                         [("tasks", f"t{t}") for t in range(10)]),
                        (f"(c) ours, {args.classes}-class task over HTTP, {variant}", "/v1/tasks/big/classify", [])]
        bares = [encoders.bare(variant)] + ([encoders.bare(FP32)] if variant.precision not in ("fp32", "auto") else [])
        result.first_bare, result.figures = bracket(bares, variant, [
            (name, lambda path=path, params=params: http_figure(url, classify_request(path, params, image),
                                                                args.clients, args.seconds))
            for name, path, params in figures])
        return result
    finally:
        process.terminate()
        process.wait()


@dataclass(frozen=True)
class Peer:
    name: str
    rate: float | None  # images/s; None: skipped or failed
    note: str  # why it was skipped or failed, or how its work differs from ours
    client_cpu: float | None = None


HF_PER_IMAGE = "HF zero-shot-image-classification pipeline, per image"
HF_BATCHED = f"HF zero-shot-image-classification pipeline, batch {PEER_BATCH}"
INFINITY = "infinity-emb over HTTP"


def failed(error: BaseException) -> str:
    return f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def hf_pipeline_peers(args, model_dir: Path, image: bytes) -> list[Peer]:
    """transformers' pipeline on the same JPEG and the same ten labels, which it re-encodes on every call."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device=args.device)

    def images(n: int) -> list[Image.Image]:
        return [Image.open(io.BytesIO(image)) for _ in range(n)]

    note = "in-process, no HTTP; labels re-encoded per call"
    peers = []
    for name, run in ((HF_PER_IMAGE, lambda: timed_rate(lambda: pipe(images(1)[0], candidate_labels=LABELS), 1,
                                                        args.seconds)),
                      (HF_BATCHED, lambda: timed_rate(lambda: pipe(images(PEER_BATCH), candidate_labels=LABELS,
                                                                   batch_size=PEER_BATCH), PEER_BATCH, args.seconds))):
        try:
            peers.append(Peer(name, run(), note))
        except Exception as error:  # a peer that breaks is a row, never the end of the run
            peers.append(Peer(name, None, failed(error)))
        progress(f"{name}: {peers[-1].rate or peers[-1].note}")
    return peers


def infinity_peer_figure(args, model_dir: Path, image: bytes) -> Peer:
    reason = infinity_peer.missing_reason(args.infinity_python)
    if reason is None and args.device != "cpu":
        reason = "this bench runs infinity-emb on CPU only"
    if reason:
        return Peer(INFINITY, None, reason)
    try:
        process, url = infinity_peer.start_infinity(args.infinity_python, model_dir, free_port(), args.batch)
    except RuntimeError as error:
        return Peer(INFINITY, None, str(error))
    try:
        body = infinity_peer.embeddings_body(image)
        figure = http_figure(url, lambda client: client.post("/embeddings", json=body), args.clients, args.seconds,
                             histogram=False)
    except Exception as error:  # e.g. a 500 from the peer: a row saying so, and the run goes on
        return Peer(INFINITY, None, failed(error))
    finally:
        process.terminate()
        process.wait()
    return Peer(INFINITY, figure.run.rate, f"{args.clients} clients, torch engine, image embeddings only (no "
                "classification), JPEG as a base64 data URI", figure.run.client_cpu)


def measure_peers(args, image: bytes, workdir: str) -> list[Peer]:
    """All peers on a random-weight HF CLIP of the same architecture, or each with the reason it was skipped."""
    names = (HF_PER_IMAGE, HF_BATCHED, INFINITY)
    try:
        from bench.hf_clip import save_random_hf_clip
    except ImportError as error:
        reason = f"transformers is not installed ({error}); bench/install_peers.sh"
        return [Peer(name, None, reason) for name in names]
    model_dir = Path(workdir) / "hf-clip"
    model_dir.mkdir()
    try:
        save_random_hf_clip(args.model, model_dir)
    except Exception as error:  # ValueError for an architecture it cannot mirror; anything else is a failed peer
        return [Peer(name, None, str(error) if isinstance(error, ValueError) else failed(error)) for name in names]
    try:
        hf = hf_pipeline_peers(args, model_dir, image)
    except Exception as error:
        hf = [Peer(name, None, failed(error)) for name in names[:2]]
    infinity = infinity_peer_figure(args, model_dir, image)
    progress(f"{INFINITY}: {infinity.rate or infinity.note}")
    return [*hf, infinity]


def cpu_use(client_cpu: float) -> str:
    return f"{client_cpu:.2f} ({client_cpu / os.cpu_count():.0%} of {os.cpu_count()} cores)"


def print_table(header: tuple[str, ...], rows: list[tuple]) -> None:
    print("| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print()


def http_detail_rows(figures: list[Bracketed]) -> list[tuple]:
    rows = []
    for f in figures:
        batches = f.figure.batches or {}
        rows.append((f.name, f"{f.rate:.2f}", f"{f.before[0]:.2f}", f"{f.after[0]:.2f}", f"{f.share_of_bare:.0%}",
                     cpu_use(f.figure.run.client_cpu), format_buckets(batches), f"{share_at_most(batches, 2):.0%}"))
    return rows


def precision_rows(results: list[VariantResult], rooflines: dict[str, float], baseline: Bracketed | None
                   ) -> list[tuple]:
    """Per variant: bare and HTTP against the fp32 bare encoder of the same minute, HTTP against fp32's HTTP (raw, and
    with each scaled by its own minute's fp32 bare, which cancels the machine's drift between them), agreement."""
    rows = []
    for r in results:
        if r.failure or not r.figures:
            rows.append((str(r.variant), "", "", "", "", "", r.failure or "not measured"))
            continue
        b = r.figures[0]
        bare_vs_fp32 = b.bare / b.fp32_bare
        http_vs = ""
        if baseline is not None:
            raw = b.rate / baseline.rate
            drift_free = (b.rate / b.fp32_bare) / (baseline.rate / baseline.fp32_bare)
            http_vs = f"{raw:.2f}x ({drift_free:.2f}x drift-corrected)"
        roofline = rooflines.get(r.serving)
        rows.append((f"{r.variant} (serving {r.serving})", f"{b.bare:.2f}" + (
                     f" ({b.bare / roofline:.0%} of roofline)" if roofline else ""),
                     f"{b.fp32_bare:.2f}", f"{bare_vs_fp32:.2f}x", f"{b.rate:.2f} ({b.rate / b.fp32_bare:.2f}x)",
                     http_vs, r.agreement or "fp32 (the reference)"))
    return rows


def peer_rows(peers: list[Peer], ours: Bracketed) -> list[tuple]:
    rows = []
    for p in peers:
        if p.rate is None:
            rows.append((p.name, "failed" if p.note.startswith("failed") else "skipped", "", "", p.note))
            continue
        cpu = cpu_use(p.client_cpu) if p.client_cpu is not None else ""
        rows.append((p.name, f"{p.rate:.2f} img/s", f"{p.rate / ours.rate:.2f}x ours (ours {ours.rate / p.rate:.2f}x "
                     "faster)", cpu, p.note))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, help="measuring time per throughput number (15; --quick 3)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--classes", type=int, help="classes of the large task in (c) and (d) (1000; --quick 50)")
    parser.add_argument("--batch", type=int, help="batch size of the bare encoder and of infinity-emb (32; --quick 8)")
    parser.add_argument("--precisions", default="fp32,bf16,int8",
                        help="image precisions to measure on CPU, comma-separated (fp32 is the baseline)")
    parser.add_argument("--batch-sweep", default="", help="also the bare encoder of the default variant at these batch "
                        "sizes, comma-separated (e.g. 1,8,32,128 on a GPU)")
    parser.add_argument("--no-peers", action="store_true", help="skip (f)")
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script end to end")
    parser.add_argument("--infinity-python", default=sys.executable,
                        help="interpreter that has infinity-emb installed (bench/install_peers.sh makes one)")
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 15.0)
    args.classes = args.classes or (50 if args.quick else 1000)
    args.batch = args.batch or (8 if args.quick else 32)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.batch_sweep = [int(b) for b in args.batch_sweep.split(",") if b.strip()]
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    print(f"# {args.model} (random weights) on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clients} clients, {args.seconds:g} s per figure, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the start\n", flush=True)

    # CPU: the fp32 torch encoder (the other variants load their own); CUDA: the service's default there, fp16
    torch_backbone = load_backbone(BackboneSpec(args.model, device=args.device,
                                                image_precision="fp32" if args.device == "cpu" else "auto"))
    per_image = image_flops(torch_backbone)
    rows = [("image tower cost", f"{per_image / 1e9:.2f} GFLOP/image", "")]
    rooflines = {}
    for precision, dtype in CEILINGS["cpu" if args.device == "cpu" else "cuda"]:
        peak = matmul_peak(dtype, 3, args.device)
        rooflines[precision] = peak / per_image
        ratio = "" if precision == "fp32" else f"{peak / (rooflines['fp32'] * per_image):.2f}x fp32; "
        rows.append((f"{precision} matmul peak (2048³{', torch._int_mm' if dtype == torch.int8 else ''})",
                     f"{peak / 1e9:.1f} {'GOP/s' if dtype == torch.int8 else 'GFLOP/s'}",
                     f"{ratio}roofline {rooflines[precision]:.2f} img/s"))
        progress(f"{rows[-1][0]}: {rows[-1][1]} ({rows[-1][2]})")
    image = sample_image_bytes(torch_backbone.model.visual.image_size[0])
    results: list[VariantResult] = []
    with tempfile.TemporaryDirectory() as workdir:
        encoders = Encoders(args, torch_backbone, workdir)
        for batch in args.batch_sweep:
            variant = default_variant(args.device)
            rate = encoders.bare(variant, batch)()
            rows.append((f"(a) bare encoder, {variant}, batch {batch} (sweep)", f"{rate:.2f} img/s", ""))
            progress(f"{rows[-1][0]}: {rows[-1][1]}")
        for variant in variants(args.device, args.precisions):
            try:
                results.append(serve_and_measure(args, variant, encoders, image, workdir, rows))
            except Exception as error:  # one variant's failure is a row; the figures already measured stay
                traceback.print_exc()
                results.append(VariantResult(variant, "", failure=failed(error)))
            progress(f"{variant}: {results[-1].failure or 'measured'}")
            if variant != FP32:
                encoders.backbones.pop(variant, None)  # its memory back; fp32's stays the baseline to the end
        peers = [] if args.no_peers else measure_peers(args, image, workdir)
    figures = [f for r in results for f in r.figures]
    baseline = next((f for f in figures if f.name.startswith("(b)") and f.variant in (FP32, Variant("torch", "auto"))),
                    None)
    default = default_variant(args.device)
    ours = next((f for f in figures if f.name.startswith("(b)") and f.variant == default), baseline)
    for r in results:
        if r.first_bare:
            roofline = rooflines.get(r.serving, rooflines["fp32"])
            rows.append((f"(a) bare encoder, {r.variant}, batch {args.batch}", f"{r.first_bare[0]:.2f} img/s",
                         f"{r.first_bare[0] / roofline:.0%} of {r.serving if r.serving in rooflines else 'fp32'} "
                         "roofline"))
    for f in figures:
        rows.append((f.name, f"{f.rate:.2f} img/s", f"{f.share_of_bare:.0%} of bare {f.variant} encoder"
                     + (f", cost {baseline.rate / f.rate:.2f}x of one task" if "(e)" in f.name and baseline else "")))
    if ours is not None:
        naive = naive_pipeline_rate(torch_backbone, LABELS, image, args.seconds)
        rows.append(("(c) naive pipeline, 10 labels re-encoded", f"{naive:.2f} img/s",
                     f"ours ({ours.variant}) {ours.rate / naive:.2f}x faster (HTTP included)"))
    plain_s, fast_s, diff = activation_ratio(torch_backbone, args.classes)
    rows.append((f"(d) text features, {args.classes} classes, plain 77-token", f"{plain_s:.2f} s", ""))
    rows.append((f"(d) text features, {args.classes} classes, ours", f"{fast_s:.2f} s",
                 f"{plain_s / fast_s:.1f}x faster, max abs diff {diff:.1e}"))

    print()
    print_table(("measurement", "value", "ratio"), rows)
    print(f"Image precisions: bare encoder (batch {args.batch}) and HTTP (b), each against the fp32 bare encoder "
          f"({FP32}) measured in the same minute; agreement with fp32 from the startup check on the calibration set")
    print_table(("variant", "bare img/s", "fp32 bare, same minute", "bare vs fp32", "HTTP img/s (vs fp32 bare)",
                 "HTTP vs fp32 HTTP", "agreement with fp32"), precision_rows(results, rooflines, baseline))
    print("HTTP runs: bare encoder of the same variant right before and after each; batches from the server's "
          f"/metrics ({BATCH_HISTOGRAM}, rows:batches) during the measured part only")
    print_table(("HTTP figure", "img/s", "bare before", "bare after", "of bare (mean)", "client CPU-s/s",
                 "batch rows histogram", "batches of 1-2 rows"), http_detail_rows(figures))
    if ours is not None and peers:
        print(f"Peers, same architecture and JPEG, against ours: {ours.name}")
        print_table(("peer", "value", "ratio", "client CPU-s/s", "note"), peer_rows(peers, ours))
    print(f"total time {time.perf_counter() - started:.0f} s, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
