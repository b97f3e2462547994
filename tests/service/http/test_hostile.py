"""Hostile input against a real `python -m service` process over TCP.

Every case must answer its documented status and code (docs/errors.md) with a JSON body, in bounded time,
with the server's peak RSS growing by less than RSS_BOUND, the registry byte-for-byte unchanged, and the
task's previous version still serving.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import socket
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from bench.process import ServiceProcess
from service.bundle.codec import MANIFEST_KEY, encode_bundle
from service.bundle.manifest import Manifest
from service.config import DECODE_BYTES_PER_PIXEL, PARSE_FACTOR
from service.core.records import BackboneRef, PromptLayout
from tests.helpers import ADMIN, hostile_server, registry_snapshot

pytestmark = pytest.mark.slow  # one real server process for the module (~15 s to start on 2 cores)
RSS_BOUND = 64 * 1024 * 1024  # per case: the cheapest real refusal stays far below, any decode bomb far above
TIME_BOUND_S = 15.0
FIXED_BYTES = 4 * 1024 * 1024  # what any request costs beside its body (answer, exceptions, allocator pages)
OCTET = {"Content-Type": "application/octet-stream"}
LIMITS = dict(max_image_pixels="1000000", max_request_pixels="1500000", max_aspect_ratio="20",
              max_answer_predictions="200", max_classes="500", body_timeout_s="2", header_timeout_s="2",
              max_images_per_request="8", max_image_bytes=str(2 * 1024 * 1024), max_bundle_bytes=str(8 * 1024 * 1024))


@dataclass
class Context:
    server: ServiceProcess
    ref: BackboneRef
    width: int
    good: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    server = hostile_server(tmp_path_factory.mktemp("hostile") / "registry", **LIMITS)
    try:
        backbone = server.wait_ready()["backbone"]
        ref = BackboneRef(backbone["model"], backbone["pretrained"], backbone["fingerprint"])
        context = Context(server, ref, backbone["text_width"])
        first = httpx.post(f"{server.url}/v1/tasks/pets/versions", headers=ADMIN | OCTET, timeout=60,
                           content=coop(context, ["cat", "dog", "bird"]))
        assert first.status_code == 201, first.text
        context.good = first.json()
        yield context
    finally:
        server.stop()


# --- building hostile payloads -------------------------------------------------------------------------


def coop(c: Context, classes: list[str], ctx_tensor: torch.Tensor | None = None) -> bytes:
    ctx_tensor = ctx_tensor if ctx_tensor is not None else torch.randn(4, c.width) * 0.02
    return encode_bundle(Manifest("coop", c.ref, tuple(classes), PromptLayout(4, c.width)), {"ctx": ctx_tensor})


def raw_manifest(c: Context, **changes) -> dict:
    raw = json.loads(Manifest("coop", c.ref, ("cat", "dog"), PromptLayout(4, c.width)).to_json())
    return raw | changes


def raw_bundle(c: Context, tensors: dict | None = None, **changes) -> bytes:
    """A bundle written around the writer's checks, as an attacker would."""
    tensors = {"ctx": torch.zeros(4, c.width)} if tensors is None else tensors
    return safetensors.torch.save(tensors, metadata={MANIFEST_KEY: json.dumps(raw_manifest(c, **changes))})


def zeroshot(c: Context, templates: list[str]) -> bytes:
    raw = raw_manifest(c, method="zeroshot", prompt={}, options={"templates": templates})
    return safetensors.torch.save({}, metadata={MANIFEST_KEY: json.dumps(raw)})


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def deep_metrics_bundle(c: Context, depth: int) -> bytes:
    """Nesting too deep for json.dumps itself, so the manifest text is spliced by hand."""
    text = json.dumps(raw_manifest(c, metrics="@")).replace('"@"', '{"x": ' + "[" * depth + "]" * depth + "}")
    return safetensors.torch.save({"ctx": torch.zeros(4, c.width)}, metadata={MANIFEST_KEY: text})


def header_with(extra: str) -> bytes:
    """A safetensors file whose JSON header carries `extra` (raw JSON text) under an extra key."""
    header = ('{"__metadata__": {"x": "y"}, "junk": ' + extra + "}").encode()
    return struct.pack("<Q", len(header)) + header


def encoded(fmt: str, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def blank_png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width × height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(
        b"IEND", b"")


# --- requests --------------------------------------------------------------------------------------------


def upload(data: bytes, task: str = "pets", headers: dict | None = None) -> Callable[[Context], httpx.Response]:
    return lambda c: httpx.post(f"{c.server.url}/v1/tasks/{task}/versions", content=data,
                                headers=ADMIN | OCTET | (headers or {}), timeout=60)


def classify(*images: bytes, task: str = "pets", top_k: int = 2) -> Callable[[Context], httpx.Response]:
    files = [("images", (f"img{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    return lambda c: httpx.post(f"{c.server.url}/v1/tasks/{task}/classify", files=files, params={"top_k": top_k},
                                timeout=60)


def classify_many(tasks: list[str], *images: bytes, top_k: int) -> Callable[[Context], httpx.Response]:
    files = [("images", (f"img{i}", data, "image/png")) for i, data in enumerate(images)]
    params = [("tasks", t) for t in tasks] + [("top_k", str(top_k))]
    return lambda c: httpx.post(f"{c.server.url}/v1/classify", files=files, params=params, timeout=60)


def raw(head: bytes) -> Callable[[Context], httpx.Response]:
    """A request httpx would refuse to send (a Content-Length it cannot honour), over a plain socket."""
    def send(c: Context) -> httpx.Response:
        reply, _ = _raw_http(c, head, [], pause_s=1)
        status_line, rest = reply.split(b"\r\n", 1)
        head_lines, body = rest.split(b"\r\n\r\n", 1)
        headers = [tuple(line.decode().split(": ", 1)) for line in head_lines.split(b"\r\n")]
        return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)
    return send


def request(method: str, path: str, **kw) -> Callable[[Context], httpx.Response]:
    return lambda c: httpx.request(method, f"{c.server.url}{path}", timeout=60, **kw)


SMALL = encoded("PNG")

BUNDLE_CASES = {
    "deeply nested options": (lambda c: upload(raw_bundle(c, options={"x": nested(50)})), 422, "options"),
    "nesting beyond the parser's depth": (lambda c: upload(deep_metrics_bundle(c, 5000)), 422, "manifest"),
    "nested junk in the safetensors header": (lambda c: upload(header_with("[" * 100_000 + "]" * 100_000)), 422,
                                              "file"),
    "classnames as an object": (lambda c: upload(raw_bundle(c, classnames={"a": 1})), 422, "classnames"),
    "n_ctx as a string": (lambda c: upload(raw_bundle(c, prompt={"n_ctx": "4", "ctx_dim": c.width})), 422,
                          "prompt.n_ctx"),
    "n_ctx as a float": (lambda c: upload(raw_bundle(c, prompt={"n_ctx": 4.0, "ctx_dim": c.width})), 422,
                         "prompt.n_ctx"),
    "class_specific as a string": (lambda c: upload(raw_bundle(
        c, prompt={"n_ctx": 4, "ctx_dim": c.width, "class_specific": "yes"})), 422, "prompt.class_specific"),
    "metrics as a list": (lambda c: upload(raw_bundle(c, metrics=[1, 2])), 422, "metrics"),
    "NaN in metrics": (lambda c: upload(raw_bundle(c, metrics={"acc": float("nan")})), 422, "metrics"),
    "created is not a date": (lambda c: upload(raw_bundle(c, created="soon")), 422, "created"),
    "200k classes (format limit)": (lambda c: upload(raw_bundle(c, classnames=[f"c{i}" for i in range(200_000)])),
                                    422, "classnames"),
    "600 classes (service limit)": (lambda c: upload(coop(c, [f"c{i}" for i in range(600)])), 422, "classnames"),
    "90k classes with one duplicate": (lambda c: upload(raw_bundle(
        c, classnames=[f"c{i}" for i in range(90_000)] + ["c5"])), 422, "classnames"),
    "a 10k-character class name": (lambda c: upload(raw_bundle(c, classnames=["x" * 10_000])), 422, "classnames"),
    "a class name with control characters": (lambda c: upload(raw_bundle(c, classnames=["a\x00b"])), 422,
                                             "classnames"),
    "huge finite context values": (lambda c: upload(raw_bundle(c, {"ctx": torch.full((4, c.width), 3e38)})), 422,
                                   "ctx"),
    "infinite context values": (lambda c: upload(raw_bundle(c, {"ctx": torch.full((4, c.width), float("inf"))})),
                                422, "ctx"),
    "context as int32": (lambda c: upload(raw_bundle(c, {"ctx": torch.zeros(4, c.width, dtype=torch.int32)})), 422,
                         "ctx"),
    "context of the wrong shape": (lambda c: upload(raw_bundle(c, {"ctx": torch.zeros(5, c.width)})), 422, "ctx"),
    "an extra tensor": (lambda c: upload(raw_bundle(c, {"ctx": torch.zeros(4, c.width), "x": torch.zeros(1)})),
                        422, "x"),
    "n_ctx beyond the text context": (lambda c: upload(raw_bundle(
        c, {"ctx": torch.zeros(100, c.width)}, prompt={"n_ctx": 100, "ctx_dim": c.width})), 422, "prompt.n_ctx"),
    "a class-specific context of 2^31 values": (lambda c: upload(raw_bundle(
        c, {}, method="qprompt", options={"bits": 1}, classnames=[f"c{i}" for i in range(512)],
        prompt={"n_ctx": 512, "ctx_dim": 8192, "class_specific": True})), 422, "prompt"),
    "format-string attack template": (lambda c: upload(zeroshot(c, ["{0.__class__.__mro__}{}"])), 422,
                                      "options.templates"),
    "padding-allocation template": (lambda c: upload(zeroshot(c, ["{:>999999999}"])), 422, "options.templates"),
    "template with two slots": (lambda c: upload(zeroshot(c, ["{} {}"])), 422, "options.templates"),
    "template without a slot": (lambda c: upload(zeroshot(c, ["a photo"])), 422, "options.templates"),
    "templates as a string": (lambda c: upload(zeroshot(c, "a {}")), 422, "options.templates"),
    "another backbone's fingerprint": (lambda c: upload(raw_bundle(
        c, backbone={"model": c.ref.model, "pretrained": c.ref.pretrained, "fingerprint": "sha256:00"})), 422,
        "backbone.fingerprint"),
    "unknown method": (lambda c: upload(raw_bundle(c, method="lora")), 422, "method"),
    "random bytes": (lambda c: upload(np.random.default_rng(1).bytes(5000)), 422, "file"),
    "a truncated bundle": (lambda c: upload(coop(c, ["a", "b"])[:-50]), 422, "tensors"),
    "a pickle": (lambda c: upload(pickle.dumps({"ctx": torch.zeros(4)})), 422, "file"),
    "header shape that is not a list": (lambda c: upload(_bad_shape_entry(c)), 422, "ctx"),
}


def _bad_shape_entry(c: Context) -> bytes:
    data = raw_bundle(c)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["ctx"]["shape"] = "abc"
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


CASES: dict[str, tuple[Callable[[Context], Callable[[Context], httpx.Response]], int, str, str | None]] = {
    **{name: (build, status, "invalid_bundle", where) for name, (build, status, where) in BUNDLE_CASES.items()},
    "empty bundle body": (lambda c: upload(b""), 422, "empty_bundle", None),
    "bundle as JSON content type": (lambda c: upload(b"{}", headers={"Content-Type": "application/json"}), 415,
                                    "bad_content_type", None),
    "bundle body declared too large": (lambda c: raw(b"POST /v1/tasks/pets/versions HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 1000000000\r\n\r\n"), 413,
                                       "body_too_large", None),
    **{f"truncated {fmt}": (lambda c, f=fmt: classify(encoded(f)[: len(encoded(f)) // 2]), 422, "corrupt_image",
                            None) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")},
    "garbage image": (lambda c: classify(b"\x00" * 3000), 415, "not_an_image", None),
    "PNG signature and nothing else": (lambda c: classify(b"\x89PNG\r\n\x1a\n"), 415, "not_an_image", None),
    "TIFF is not served": (lambda c: classify(encoded("TIFF")), 415, "not_an_image", None),
    "100-byte PNG claiming 40000x40000": (lambda c: classify(png_claiming(40_000, 40_000)), 413,
                                          "image_too_many_pixels", None),
    "100-byte PNG claiming 1100x1000": (lambda c: classify(png_claiming(1100, 1000)), 413, "image_too_many_pixels",
                                        None),
    "PNG claiming 0x0": (lambda c: classify(png_claiming(0, 0)), 415, "not_an_image", None),
    "extreme aspect ratio": (lambda c: classify(blank_png((4000, 10))), 422, "bad_aspect_ratio", None),
    "too many pixels summed over the request": (lambda c: classify(*[blank_png((900, 900))] * 2), 413,
                                                "request_too_many_pixels", None),
    "too many images": (lambda c: classify(*[SMALL] * 9), 413, "too_many_images", None),
    "answer too large (tasks x images x top_k)": (lambda c: classify_many(["shapes", "colours"], *[SMALL] * 8,
                                                                          top_k=1000), 413, "answer_too_large", None),
    "classify neither multipart nor JSON": (lambda c: request("POST", "/v1/tasks/pets/classify", content=b"x",
                                                              headers={"Content-Type": "text/plain"}), 415,
                                   "bad_content_type", None),
    "multipart without images": (lambda c: request("POST", "/v1/tasks/pets/classify", files={"a": (None, "b")}),
                                 422, "no_images", None),
    "broken multipart": (lambda c: request("POST", "/v1/tasks/pets/classify", content=b"--zz\r\nbroken",
                                           headers={"Content-Type": "multipart/form-data; boundary=zz"}), 422,
                         "no_images", None),
    "unknown task": (lambda c: classify(SMALL, task="nope"), 404, "unknown_task", None),
    "task name with dots and slashes": (lambda c: request("GET", "/v1/tasks/..%2Fetc"), 404, "not_found", None),
    "task name with a space": (lambda c: request("GET", "/v1/tasks/a%20b"), 422, "invalid_request", "path.task"),
    "task name of 300 characters": (lambda c: request("GET", "/v1/tasks/" + "a" * 300), 422, "invalid_request",
                                    "path.task"),
    "bad task name in the query": (lambda c: classify_many(["a b"], SMALL, top_k=1), 422, "invalid_request",
                                   "query.tasks.0"),
    "top_k of a billion": (lambda c: classify(SMALL, top_k=10**9), 422, "invalid_request", "query.top_k"),
    "unknown route": (lambda c: request("GET", "/v1/nothing/here"), 404, "not_found", None),
    "unknown method": (lambda c: request("BREW", "/v1/tasks"), 405, "method_not_allowed", None),
    "20 KB of headers": (lambda c: request("GET", "/v1/tasks", headers={"X-Big": "a" * 20_000}), 431,
                         "headers_too_large", None),
    "200 KB of headers": (lambda c: request("GET", "/v1/tasks", headers={"X-Big": "a" * 200_000}), 400,
                          "bad_http_request", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_refused_cheaply_and_changes_nothing(ctx, name):
    build, status, code, where = CASES[name]
    send = build(ctx)
    before = registry_snapshot(ctx.server.registry)
    baseline = ctx.server.reset_peak_rss()
    start = time.monotonic()
    response = send(ctx)
    elapsed = time.monotonic() - start
    growth = ctx.server.peak_rss() - baseline

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code and body["detail"], body
    if where is not None:
        assert body["field"] == where, body
    assert elapsed < TIME_BOUND_S
    assert growth < RSS_BOUND, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert registry_snapshot(ctx.server.registry) == before
    _still_serving(ctx)


def _still_serving(c: Context) -> None:
    detail = httpx.get(f"{c.server.url}/v1/tasks/pets", timeout=30).json()
    assert detail["version"] == c.good["version"] and detail["classnames"] == c.good["classnames"]
    answer = classify(SMALL)(c)
    assert answer.status_code == 200 and answer.json()["version"] == c.good["version"]


@pytest.mark.parametrize("fmt", ["BMP", "PNG", "JPEG"])
def test_a_real_decode_counts_against_the_rss_bound_and_stays_within_its_own(ctx, fmt):
    """The memory probe measures: a legitimate decode shows up in the server's peak RSS, and stays within
    what docs/serving.md "Memory" grants a decode (DECODE_BYTES_PER_PIXEL)."""
    data, pixels = encoded(fmt, (800, 800)), 800 * 800  # within the 2 MiB image limit above
    baseline = ctx.server.reset_peak_rss()
    assert classify(data)(ctx).status_code == 200
    growth = ctx.server.peak_rss() - baseline
    assert 3 * pixels < growth <= PARSE_FACTOR * len(data) + DECODE_BYTES_PER_PIXEL * pixels + FIXED_BYTES, growth


def _raw_http(c: Context, head: bytes, body_chunks: list[bytes], pause_s: float) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", c.server.port), timeout=20) as sock:
        sock.sendall(head)
        reply = b""
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server hung up on us: that is the point
                break
            sock.settimeout(pause_s)
            try:
                reply += sock.recv(65536)
            except TimeoutError:
                continue
            if reply:
                break
        sock.settimeout(20)
        while data := sock.recv(65536):
            reply += data
    return reply, time.monotonic() - start


def test_a_client_trickling_its_body_gets_408_in_bounded_time(ctx):
    before = registry_snapshot(ctx.server.registry)
    head = (b"POST /v1/tasks/pets/versions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-token\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
    reply, elapsed = _raw_http(ctx, head, [b"x"] * 40, pause_s=0.25)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["code"] == "body_timeout"
    assert elapsed < 2 + 3  # body_timeout_s plus slack
    assert registry_snapshot(ctx.server.registry) == before
    _still_serving(ctx)


def test_a_client_trickling_its_headers_gets_408_in_bounded_time(ctx):
    reply, elapsed = _raw_http(ctx, b"GET /v1/tasks HTTP/1.1\r\n", [b"X-Slow: a\r\n"] * 40, pause_s=0.25)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["code"] == "header_timeout"
    assert elapsed < 2 + 3
    _still_serving(ctx)


def test_metric_labels_never_carry_raw_request_data(ctx):
    httpx.request("BREW", f"{ctx.server.url}/zz-unique-path-1234", timeout=10)
    metrics = httpx.get(f"{ctx.server.url}/metrics", timeout=10).text
    assert "zz-unique-path-1234" not in metrics and "BREW" not in metrics
    assert 'method="other",route="unmatched"' in metrics


# --- memory per request against the body size, for each body format ----------------------------------------

BODY_LIMIT = 8 * 2 * 1024 * 1024 + 1024 * 1024  # the classify body limit of LIMITS above
V2 = {"Content-Type": "application/octet-stream"}


def _multipart(parts: list[tuple[str, bytes]], boundary: bytes = b"pSboundary") -> tuple[bytes, dict]:
    body = b"".join(b"--%s\r\nContent-Disposition: form-data; name=\"images\"; filename=\"%s\"\r\n"
                    b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary, name.encode(), data)
                    for name, data in parts) + b"--%s--\r\n" % boundary
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"}


def _v2(header: dict, binary: bytes = b"") -> tuple[bytes, dict]:
    text = json.dumps(header).encode()
    return text + binary, ({"Inference-Header-Content-Length": str(len(text))} | V2) if binary else V2


def _fill(unit: bytes, budget: int) -> int:
    return (budget - 200) // len(unit)


def _json_images(items: list[dict]) -> tuple[bytes, dict]:
    return json.dumps({"images": items}).encode(), {"Content-Type": "application/json"}


NOT_AN_IMAGE = np.random.default_rng(2).bytes(2 * 1024 * 1024 - 64)
B64 = base64.b64encode(NOT_AN_IMAGE[: 1_500_000]).decode()
V2_INPUT = {"name": "images", "datatype": "BYTES"}
BODIES: dict[str, tuple[str, Callable[[], tuple[bytes, dict]], int, str]] = {
    # name: (route, body builder, expected status, code)
    "multipart, 8 files at the size limit": ("classify", lambda: _multipart([("f", NOT_AN_IMAGE)] * 8), 415,
                                             "not_an_image"),
    "multipart, 200k empty files": ("classify", lambda: _multipart([("f", b"")] * _fill(b"x" * 140, BODY_LIMIT)),
                                    413, "too_many_images"),
    "JSON, 8 images at the size limit": ("classify", lambda: _json_images([{"name": "a", "data": B64}] * 8),
                                         415, "not_an_image"),
    "JSON, a million empty image objects": ("classify", lambda: _json_images(
        [{"data": ""}] * _fill(b'{"data": ""}, ', BODY_LIMIT)), 413, "too_many_values"),
    "V2 JSON, 8 images at the size limit": ("infer", lambda: _v2({"inputs": [V2_INPUT | {"shape": [8],
                                                                                        "data": [B64] * 8}]}),
                                            415, "not_an_image"),
    "V2 JSON, millions of empty elements": ("infer", lambda: _v2({"inputs": [V2_INPUT | {
        "shape": [8], "data": [""] * _fill(b'"", ', BODY_LIMIT)}]}), 413, "too_many_values"),
    "V2 JSON, 100k empty inputs": ("infer", lambda: _v2({"inputs": [{}] * _fill(b"{}, ", BODY_LIMIT)}), 413,
                                   "too_many_values"),
    "V2 binary, 8 images at the size limit": ("infer", lambda: _v2(
        {"inputs": [V2_INPUT | {"shape": [8], "parameters": {"binary_data_size": 8 * (4 + len(NOT_AN_IMAGE))}}]},
        b"".join(struct.pack("<I", len(NOT_AN_IMAGE)) + NOT_AN_IMAGE for _ in range(8))), 415, "not_an_image"),
    "V2 binary, millions of empty elements": ("infer", lambda: _v2(
        {"inputs": [V2_INPUT | {"shape": [8], "parameters": {"binary_data_size": 4 * _fill(b"1234", BODY_LIMIT)}}]},
        b"\0\0\0\0" * _fill(b"1234", BODY_LIMIT)), 422, "bad_shape"),
}


@pytest.mark.parametrize("name", list(BODIES))
def test_peak_memory_per_request_is_a_small_multiple_of_its_body(ctx, name):
    """Counted before materialised: whatever the shape of a body, its request costs at most PARSE_FACTOR times its
    size (a million tiny JSON objects cost ~28× with json.loads)."""
    route, build, status, code = BODIES[name]
    body, headers = build()
    assert len(body) <= BODY_LIMIT
    url = ctx.server.url + ("/v1/tasks/pets/classify" if route == "classify" else "/v2/models/pets/infer")
    baseline = ctx.server.reset_peak_rss()
    response = httpx.post(url, content=body, headers=headers, timeout=60)
    growth = ctx.server.peak_rss() - baseline
    assert (response.status_code, response.json()["code"]) == (status, code), response.text[:300]
    assert len(response.content) < 2000  # a bounded detail, never an echo of the body
    print(f"{name}: body {len(body) / 2**20:.1f} MiB, peak RSS +{growth / 2**20:.1f} MiB "
          f"({growth / len(body):.2f}x)")
    assert growth <= PARSE_FACTOR * len(body) + FIXED_BYTES, f"{growth / len(body):.1f}x the body"

