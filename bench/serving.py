"""Serving benchmark: every number is measured in this run, and every claim is a ratio against a baseline
measured in the same run.

    python bench/serving.py                       # ViT-B-32 shape, random weights, CPU
    python bench/serving.py --quick               # the same end to end in short runs (checks the script)
    python bench/serving.py --model ViT-B-16 --device cuda

(a) bare image encoder images/s (torch, ONNX Runtime) against the fp32 matmul roofline measured here;
(b) end-to-end HTTP classify images/s with N concurrent clients, each against the bare encoder of the same
    backend measured right before and right after it; with the server's batch-size histogram for the run
    (from /metrics) and the load generator's own CPU use;
(c) a naive pipeline that re-encodes the label prompts for every request (as Hugging Face's zero-shot
    pipeline does), against (b);
(d) activation time of a large task: open_clip's plain 77-token text path against ours;
(e) one task against ten tasks per image, over HTTP;
(f) peers on the same architecture and input, against (b): the Hugging Face zero-shot pipeline per image and
    at batch 8 (random-weight CLIPModel), and infinity-emb over HTTP with the same clients.
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
from collections.abc import Callable
from dataclasses import dataclass
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
from service.core.backbone import BackboneSpec, load_backbone  # noqa: E402
from service.core.records import PromptLayout  # noqa: E402
from service.serving.text_features import text_features  # noqa: E402

TOKEN = "bench-token"
BATCH_HISTOGRAM = "promptserve_batch_rows"
WARMUP_S = 2.0
PEER_BATCH = 8
LABELS = [f"label {i}" for i in range(10)]


def matmul_peak_flops(seconds: float) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return timed_rate(lambda: a @ b, 2 * 2048**3, seconds)


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


def start_service(args, workdir: str, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {
        "PROMPTSERVE_MODEL": args.model, "PROMPTSERVE_PRETRAINED": "", "PROMPTSERVE_DEVICE": args.device,
        "PROMPTSERVE_REGISTRY": f"{workdir}/{backend}/registry",
        "PROMPTSERVE_ADMIN_TOKEN": TOKEN, "PROMPTSERVE_DEMO": "false", "PROMPTSERVE_IMAGE_BACKEND": backend,
        "PROMPTSERVE_ONNX_CACHE_DIR": f"{workdir}/onnx",  # shared with the bench's own bare ONNX encoder
    }
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if wait_until_answering(process, f"{url}/readyz"):
        return process, url
    process.kill()
    raise SystemExit("the service did not start")


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
    name: str
    backend: str
    figure: HttpFigure
    bare_before: float
    bare_after: float

    @property
    def bare(self) -> float:
        return (self.bare_before + self.bare_after) / 2

    @property
    def share_of_bare(self) -> float:
        return self.figure.run.rate / self.bare


def bracket(bare: Callable[[], float], backend: str, figures: list[tuple[str, Callable[[], HttpFigure]]],
            ) -> tuple[float, list[Bracketed]]:
    """Bare encoder, then each HTTP figure followed by the bare encoder again: every figure has a bare measurement
    right before and right after it (the one after also serves the next figure). Returns the first bare too."""
    first = before = bare()
    measured = []
    for name, figure in figures:
        result = figure()
        after = bare()
        measured.append(Bracketed(name, backend, result, before, after))
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


def default_backend(device: str) -> str:
    """What the service's `auto` image backend picks (service/backbone.py)."""
    return "onnx" if device == "cpu" else "torch"


def bare_encoder(args, backend: str, torch_backbone, workdir: str) -> Callable[[], float]:
    """The bare image encoder of `backend` in this process, as a measurement to repeat."""
    backbone = torch_backbone if backend == "torch" else load_backbone(
        BackboneSpec(args.model, device="cpu", image_backend="onnx", onnx_cache_dir=f"{workdir}/onnx"))
    size = torch_backbone.model.visual.image_size[0]
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    def step() -> None:
        backbone.encode_images(pixels)

    step()  # once: sessions and allocators warm, so each repeat is measured hot without a warm-up of its own
    return lambda: timed_rate(step, args.batch, args.seconds, warmup=0)


def serve_and_measure(args, backend: str, torch_backbone, image: bytes, workdir: str, rows: list
                      ) -> tuple[float, list[Bracketed]]:
    """Start the service on `backend`, publish the tasks, and measure its HTTP figures bracketed by bare ones.
    Returns the first bare measurement and the figures; appends the activation row (d) to `rows`."""
    process, url = start_service(args, workdir, backend)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
        for t in range(10):
            httpx.post(f"{url}/v1/tasks/t{t}/versions", content=coop_bundle(torch_backbone, LABELS),
                       headers=headers, timeout=600).raise_for_status()
        figures = [(f"(b) HTTP classify, {backend}, {args.clients} clients", "/v1/tasks/t0/classify", [])]
        if backend == default_backend(args.device):
            big = [f"object category number {i}" for i in range(args.classes)]
            start = time.perf_counter()
            httpx.post(f"{url}/v1/tasks/big/versions", content=coop_bundle(torch_backbone, big),
                       headers=headers, timeout=600).raise_for_status()
            rows.append((f"(d) HTTP upload+activation, {args.classes} classes, {backend}",
                         f"{time.perf_counter() - start:.2f} s", ""))
            figures += [(f"(e) HTTP, ten tasks per image, {backend}", "/v1/classify",
                         [("tasks", f"t{t}") for t in range(10)]),
                        (f"(c) ours, {args.classes}-class task over HTTP, {backend}", "/v1/tasks/big/classify", [])]
        bare = bare_encoder(args, backend, torch_backbone, workdir)
        return bracket(bare, backend, [
            (name, lambda path=path, params=params: http_figure(url, classify_request(path, params, image),
                                                                args.clients, args.seconds))
            for name, path, params in figures])
    finally:
        process.terminate()
        process.wait()


@dataclass(frozen=True)
class Peer:
    name: str
    rate: float | None  # images/s; None: skipped
    note: str  # why it was skipped, or how its work differs from ours
    client_cpu: float | None = None


HF_PER_IMAGE = "HF zero-shot-image-classification pipeline, per image"
HF_BATCHED = f"HF zero-shot-image-classification pipeline, batch {PEER_BATCH}"
INFINITY = "infinity-emb over HTTP"


def hf_pipeline_peers(args, model_dir: Path, image: bytes) -> list[Peer]:
    """transformers' pipeline on the same JPEG and the same ten labels, which it re-encodes on every call."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device=args.device)

    def images(n: int) -> list[Image.Image]:
        return [Image.open(io.BytesIO(image)) for _ in range(n)]

    per_image = timed_rate(lambda: pipe(images(1)[0], candidate_labels=LABELS), 1, args.seconds)
    batched = timed_rate(lambda: pipe(images(PEER_BATCH), candidate_labels=LABELS, batch_size=PEER_BATCH),
                         PEER_BATCH, args.seconds)
    note = "in-process, no HTTP; labels re-encoded per call"
    return [Peer(HF_PER_IMAGE, per_image, note), Peer(HF_BATCHED, batched, note)]


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
    finally:
        process.terminate()
        process.wait()
    return Peer(INFINITY, figure.run.rate, f"{args.clients} clients, torch engine, image embeddings only (no "
                "classification), JPEG as a base64 data URI", figure.run.client_cpu)


def measure_peers(args, image: bytes, workdir: str) -> list[Peer]:
    """All peers on a random-weight HF CLIP of the same architecture, or each with the reason it was skipped."""
    try:
        from bench.hf_clip import save_random_hf_clip
    except ImportError as error:
        reason = f"transformers is not installed ({error}); pip install -e '.[bench]'"
        return [Peer(name, None, reason) for name in (HF_PER_IMAGE, HF_BATCHED, INFINITY)]
    model_dir = Path(workdir) / "hf-clip"
    model_dir.mkdir()
    try:
        save_random_hf_clip(args.model, model_dir)
    except ValueError as error:
        return [Peer(name, None, str(error)) for name in (HF_PER_IMAGE, HF_BATCHED, INFINITY)]
    return [*hf_pipeline_peers(args, model_dir, image), infinity_peer_figure(args, model_dir, image)]


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
        rows.append((f.name, f"{f.figure.run.rate:.2f}", f"{f.bare_before:.2f}", f"{f.bare_after:.2f}",
                     f"{f.share_of_bare:.0%}", cpu_use(f.figure.run.client_cpu), format_buckets(batches),
                     f"{share_at_most(batches, 2):.0%}"))
    return rows


def peer_rows(peers: list[Peer], ours: Bracketed) -> list[tuple]:
    rows = []
    for p in peers:
        if p.rate is None:
            rows.append((p.name, "skipped", "", "", p.note))
            continue
        cpu = cpu_use(p.client_cpu) if p.client_cpu is not None else ""
        rows.append((p.name, f"{p.rate:.2f} img/s", f"{p.rate / ours.figure.run.rate:.2f}x ours "
                     f"(ours {ours.figure.run.rate / p.rate:.2f}x faster)", cpu, p.note))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, help="measuring time per throughput number (15; --quick 3)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--classes", type=int, help="classes of the large task in (c) and (d) (1000; --quick 50)")
    parser.add_argument("--batch", type=int, help="batch size of the bare encoder and of infinity-emb (32; --quick 8)")
    parser.add_argument("--quick", action="store_true", help="short runs, to check the script end to end")
    parser.add_argument("--infinity-python", default=sys.executable,
                        help="interpreter that has infinity-emb installed (docs/serving.md: a throwaway venv)")
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 15.0)
    args.classes = args.classes or (50 if args.quick else 1000)
    args.batch = args.batch or (8 if args.quick else 32)
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    print(f"# {args.model} (random weights) on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.clients} clients, {args.seconds:g} s per figure\n")

    torch_backbone = load_backbone(BackboneSpec(args.model, device=args.device))
    peak = matmul_peak_flops(3)
    per_image = image_flops(torch_backbone)
    roofline = peak / per_image
    rows = [("fp32 matmul peak", f"{peak / 1e9:.1f} GFLOP/s", ""),
            ("image tower cost", f"{per_image / 1e9:.2f} GFLOP/image", f"roofline {roofline:.2f} img/s")]
    image = sample_image_bytes(torch_backbone.model.visual.image_size[0])
    figures: list[Bracketed] = []
    with tempfile.TemporaryDirectory() as workdir:
        for backend in ["torch", "onnx"] if args.device == "cpu" else ["torch"]:
            first_bare, measured = serve_and_measure(args, backend, torch_backbone, image, workdir, rows)
            rows.append((f"(a) bare encoder, {backend}, batch {args.batch}", f"{first_bare:.2f} img/s",
                         f"{first_bare / roofline:.0%} of roofline"))
            figures += measured
        peers = measure_peers(args, image, workdir)
    ours = next(f for f in figures if f.name.startswith("(b)") and f.backend == default_backend(args.device))
    for f in figures:
        rows.append((f.name, f"{f.figure.run.rate:.2f} img/s", f"{f.share_of_bare:.0%} of bare {f.backend} encoder"
                     + (f", cost {ours.figure.run.rate / f.figure.run.rate:.2f}x of one task" if "(e)" in f.name
                        else "")))
    naive = naive_pipeline_rate(torch_backbone, LABELS, image, args.seconds)
    rows.append(("(c) naive pipeline, 10 labels re-encoded", f"{naive:.2f} img/s",
                 f"ours ({ours.backend}) {ours.figure.run.rate / naive:.2f}x faster (HTTP included)"))
    plain_s, fast_s, diff = activation_ratio(torch_backbone, args.classes)
    rows.append((f"(d) text features, {args.classes} classes, plain 77-token", f"{plain_s:.2f} s", ""))
    rows.append((f"(d) text features, {args.classes} classes, ours", f"{fast_s:.2f} s",
                 f"{plain_s / fast_s:.1f}x faster, max abs diff {diff:.1e}"))

    print_table(("measurement", "value", "ratio"), rows)
    print("HTTP runs: bare encoder of the same backend right before and after each; batches from the server's "
          f"/metrics ({BATCH_HISTOGRAM}, rows:batches) during the measured part only")
    print_table(("HTTP figure", "img/s", "bare before", "bare after", "of bare (mean)", "client CPU-s/s",
                 "batch rows histogram", "batches of 1-2 rows"), http_detail_rows(figures))
    print(f"Peers, same architecture and JPEG, against ours: {ours.name}")
    print_table(("peer", "value", "ratio", "client CPU-s/s", "note"), peer_rows(peers, ours))
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
