"""Serving benchmark: every number is measured in this run, and every claim is a ratio against a baseline
measured in the same run.

    python bench/serving.py                       # ViT-B-32 shape, random weights, CPU
    python bench/serving.py --model ViT-B-16 --device cuda

(a) bare image encoder images/s (torch, ONNX Runtime) against the fp32 matmul roofline measured here;
(b) end-to-end HTTP classify images/s with N concurrent clients, against (a);
(c) a naive pipeline that re-encodes the label prompts for every request (as Hugging Face's zero-shot
    pipeline does), against (b);
(d) activation time of a large task: open_clip's plain 77-token text path against ours;
(e) one task against ten tasks per image, over HTTP.
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
from pathlib import Path

import httpx
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parents[1]))

from service.backbone import BackboneSpec, load_backbone  # noqa: E402
from service.bundle import Manifest, PromptLayout, decode_bundle, encode_bundle  # noqa: E402
from service.tasks import text_features  # noqa: E402

TOKEN = "bench-token"


def timed_rate(step, items_per_step: int, seconds: float, warmup: int = 1) -> float:
    """Items per second of `step`, run repeatedly for about `seconds` after `warmup` calls."""
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += items_per_step
    return count / (time.perf_counter() - start)


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
    manifest = Manifest("coop", backbone.ref(), tuple(classnames), PromptLayout(4, backbone.text.width))
    return encode_bundle(manifest, {"ctx": ctx})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args, registry: str, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = os.environ | {
        "PROMPTSERVE_MODEL": args.model, "PROMPTSERVE_PRETRAINED": "", "PROMPTSERVE_DEVICE": args.device,
        "PROMPTSERVE_REGISTRY": registry,
        "PROMPTSERVE_ADMIN_TOKEN": TOKEN, "PROMPTSERVE_DEMO": "false", "PROMPTSERVE_IMAGE_BACKEND": backend,
        "PROMPTSERVE_ONNX_CACHE_DIR": str(Path(registry).parent / "onnx"),
    }
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the service did not start")


async def http_rate(url: str, path: str, params: list, image: bytes, clients: int, seconds: float) -> float:
    """Images/s for `clients` concurrent clients, each sending one image per request."""
    done = 0

    async def client_loop(client: httpx.AsyncClient, deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            response = await client.post(path, params=params, files=[("images", ("x.jpg", image, "image/jpeg"))])
            response.raise_for_status()
            done += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client, time.perf_counter() + 2) for _ in range(clients)))  # warm-up
        done, start = 0, time.perf_counter()
        await asyncio.gather(*(client_loop(client, start + seconds) for _ in range(clients)))
        return done / (time.perf_counter() - start)


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
    manifest = Manifest("zeroshot", backbone.ref(), tuple(classnames), options={"templates": ["a photo of a {}."]})
    bundle = decode_bundle(encode_bundle(manifest, {}))
    start = time.perf_counter()
    fast = text_features(bundle, backbone)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    plain = plain_text_features(backbone, [f"a photo of a {c}." for c in classnames])
    plain_s = time.perf_counter() - start
    return plain_s, fast_s, float((fast - plain).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=15, help="measuring time per throughput number")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--classes", type=int, default=1000, help="classes of the large task in (d)")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the bare encoder in (a)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {args.model} (random weights) on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")

    torch_backbone = load_backbone(BackboneSpec(args.model, device=args.device))
    size = torch_backbone.model.visual.image_size[0]
    pixels = torch.randn(args.batch, 3, size, size)
    peak = matmul_peak_flops(3)
    per_image = image_flops(torch_backbone)
    roofline = peak / per_image
    rows = [("fp32 matmul peak", f"{peak / 1e9:.1f} GFLOP/s", ""),
            ("image tower cost", f"{per_image / 1e9:.2f} GFLOP/image", f"roofline {roofline:.2f} img/s")]
    bare = {"torch": timed_rate(lambda: torch_backbone.encode_images(pixels), args.batch, args.seconds)}
    rows.append(("(a) bare encoder, torch", f"{bare['torch']:.2f} img/s",
                 f"{bare['torch'] / roofline:.0%} of roofline"))
    backends = ["torch"]
    if args.device == "cpu":
        with tempfile.TemporaryDirectory() as cache:
            onnx = load_backbone(BackboneSpec(args.model, device="cpu", image_backend="onnx", onnx_cache_dir=cache))
            bare["onnx"] = timed_rate(lambda: onnx.encode_images(pixels), args.batch, args.seconds)
            del onnx
        rows.append(("(a) bare encoder, ONNX Runtime", f"{bare['onnx']:.2f} img/s",
                     f"{bare['onnx'] / roofline:.0%} of roofline"))
        backends.append("onnx")

    image = sample_image_bytes(size)
    classes10 = [f"label {i}" for i in range(10)]
    with tempfile.TemporaryDirectory() as workdir:
        for backend in backends:
            process, url = start_service(args, f"{workdir}/{backend}/registry", backend)
            try:
                headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/octet-stream"}
                for t in range(10):
                    httpx.post(f"{url}/v1/tasks/t{t}/versions", content=coop_bundle(torch_backbone, classes10),
                               headers=headers, timeout=600).raise_for_status()
                one = asyncio.run(http_rate(url, "/v1/tasks/t0/classify", [], image, args.clients, args.seconds))
                rows.append((f"(b) HTTP classify, {backend}, {args.clients} clients", f"{one:.2f} img/s",
                             f"{one / bare[backend]:.0%} of bare {backend} encoder"))
                if backend == "torch":
                    ten = asyncio.run(http_rate(url, "/v1/classify", [("tasks", f"t{t}") for t in range(10)], image,
                                                args.clients, args.seconds))
                    rows.append(("(e) HTTP, ten tasks per image", f"{ten:.2f} img/s",
                                 f"cost {one / ten:.2f}x of one task"))
                    big = [f"object category number {i}" for i in range(args.classes)]
                    start = time.perf_counter()
                    httpx.post(f"{url}/v1/tasks/big/versions", content=coop_bundle(torch_backbone, big),
                               headers=headers, timeout=600).raise_for_status()
                    rows.append((f"(d) HTTP upload+activation, {args.classes} classes",
                                 f"{time.perf_counter() - start:.2f} s", ""))
                    big_rate = asyncio.run(http_rate(url, "/v1/tasks/big/classify", [], image, args.clients,
                                                     args.seconds))
                    naive = naive_pipeline_rate(torch_backbone, classes10, image, args.seconds)
                    rows.append(("(c) naive pipeline, 10 labels re-encoded", f"{naive:.2f} img/s",
                                 f"ours {one / naive:.2f}x faster (HTTP included)"))
                    rows.append((f"(c) ours, {args.classes}-class task over HTTP", f"{big_rate:.2f} img/s",
                                 "labels never re-encoded"))
            finally:
                process.terminate()
                process.wait()

    plain_s, fast_s, diff = activation_ratio(torch_backbone, args.classes)
    rows.append((f"(d) text features, {args.classes} classes, plain 77-token", f"{plain_s:.2f} s", ""))
    rows.append((f"(d) text features, {args.classes} classes, ours", f"{fast_s:.2f} s",
                 f"{plain_s / fast_s:.1f}x faster, max |diff| {diff:.1e}"))

    print("| measurement | value | ratio |\n|---|---|---|")
    for name, value, ratio in rows:
        print(f"| {name} | {value} | {ratio} |")


if __name__ == "__main__":
    main()
