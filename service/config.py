"""Service settings, read once from PROMPTSERVE_* environment variables."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.backbone import BackboneSpec
from service.serving.activation import BundleLimits

MiB = 1024 * 1024
# What requests in progress may hold (docs/serving.md, "Memory"; measured by tests/service/http/test_hostile.py):
# a request's peak while its body is read and parsed, as a multiple of the body, whatever its format and shape;
# and the bytes per decoded pixel while its images are decoded (RGB, plus a decoder's or a conversion's copy).
PARSE_FACTOR = 2.5
DECODE_BYTES_PER_PIXEL = 5
PREFIX = "PROMPTSERVE_"
# PROMPTSERVE_* variables that are not service settings: read by the client and the CLI
CLIENT_VARIABLES = frozenset({"PROMPTSERVE_URL"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True)

    model: str = Field("promptserve-tiny", description="open_clip model name (or local-dir:PATH)")
    pretrained: str | None = Field("world-v1", description="open_clip tag, embedded tag or checkpoint path; "
                                   "empty = seeded random weights")
    seed: int = Field(0, description="seed for random weights when `pretrained` is unset")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu' or 'cuda[:N]'")
    image_backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="image encoder: auto (onnx on CPU, torch on CUDA), torch, or onnx (CPU)")
    image_precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto", description="image encoder precision on CPU: auto (the fastest this CPU has native kernels for that "
        "passes the startup agreement check against fp32, else fp32), fp32, bf16 (torch) or int8 (onnx); a reduced "
        "precision that fails the check falls back to fp32 (/readyz says why). CUDA: auto = fp16, or fp32")
    onnx_cache_dir: str = Field("var/onnx", description="where exported ONNX image towers are cached")
    registry: str = Field("var/registry", description="directory that stores bundles and active versions, or a "
                          "postgresql:// URL of a registry shared by every replica")
    resync_interval_s: float = Field(10.0, gt=0, description="full resync with the registry this often, beside the "
                                     "changes it announces (heals a missed notification)")
    registry_timeout_s: float = Field(5.0, gt=0, description="PostgreSQL registry: bound on connecting, waiting for a "
                                      "pooled connection and each lock wait (a statement: twice this; a whole "
                                      "transaction: twice plus 1 s); past it the registry is unavailable (503)")
    registry_pool_size: int = Field(8, gt=0, description="PostgreSQL registry: most pooled connections per replica")
    propagation_workers: int = Field(4, gt=0, description="tasks this replica prepares at once when following "
                                     "the registry (one task's large version never delays another's change)")
    retain_versions: int = Field(0, ge=0, description="after an upload keep this many newest versions per task (and "
                                 "always the active one and alias targets); 0 keeps every version")
    prepared_versions: int = Field(4, ge=0, description="prepared inactive versions kept for pinned requests and "
                                   "instant rollback")
    pin_preparations_per_minute: int = Field(6, ge=0, description="versions that `?version=` pins may have "
                                             "prepared on demand a minute, per client and per task (prepared "
                                             "ones are free); beyond, 429. 0: only prepared versions can be pinned")
    feature_memory_bytes: int = Field(256 * MiB, ge=0, description="memory the warm tasks' heads (class text "
                                      "features, prompts) may hold together; beyond, the least recently used are "
                                      "evicted and reload from their stored artefacts on next use. 0: no limit")
    startup_warmup_s: float = Field(5.0, ge=0, description="at start, after the registry's index is read, tasks are "
                                    "activated (most recently changed first) for at most this long before the "
                                    "replica reports ready; the rest activate in the background or on first use")
    background_warmup: bool = Field(True, description="after start, keep activating cold tasks at the lowest CPU "
                                    "priority while the feature memory budget has room")
    cold_start_timeout_s: float = Field(30.0, gt=0, description="a request for a task not in memory waits this "
                                        "long for its activation, then answers 503 with Retry-After (the "
                                        "activation goes on)")
    demo: bool = Field(True, description="seed zero-shot demo tasks (shapes, colours) into a registry that never "
                       "held a task (once: not again after every task was deleted)")

    admin_token: SecretStr | None = Field(None, description="bearer token for uploads and deletes")
    classify_token: SecretStr | None = Field(None, description="if set, classify needs this (or the admin) token")

    max_bundle_bytes: int = Field(64 * MiB, gt=0)
    max_image_bytes: int = Field(16 * MiB, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="refuse larger images (decompression bombs)")
    max_images_per_request: int = Field(32, gt=0)
    max_classes: int = Field(2000, gt=0)
    max_request_pixels: int = Field(48_000_000, gt=0, description="decoded pixels summed over one request's images")
    max_aspect_ratio: float = Field(20.0, ge=1, description="refuse images longer than this many times their width")
    decode_concurrency: int = Field(4, gt=0, description="requests decoding images at once, per process")
    max_classname_chars: int = Field(200, gt=0, description="longest class name a bundle may use (format max 200)")
    max_template_chars: int = Field(300, gt=0, description="longest zero-shot template (format max 300)")
    max_templates: int = Field(64, gt=0, description="most zero-shot templates per bundle (format max 64)")
    max_text_prompts: int = Field(20_000, gt=0, description="classes × templates a bundle may ask to encode")
    max_answer_predictions: int = Field(100_000, gt=0, description="tasks × images × top_k in one answer")
    max_inflight_requests: int = Field(64, gt=0, description="classify/upload requests (and any request with a "
                                       "body) in progress at once; beyond this, answer 503 before reading the body")
    max_inflight_body_bytes: int = Field(576 * MiB, gt=0, description="body bytes those requests may declare "
                                         "together (their Content-Length, or the route's limit without one); "
                                         "beyond, 503 before reading the body. Bounds request memory "
                                         "(docs/serving.md, Memory)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this time (else 408)")
    header_timeout_s: float = Field(10.0, gt=0, description="request headers must arrive within this time")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    max_header_bytes: int = Field(16 * 1024, gt=0, description="request headers larger than this get 431")
    max_connections: int | None = Field(1000, gt=0, description="uvicorn's connection cap (plain 503 beyond)")

    batch_max_images: int = Field(32, gt=0, description="most rows (image forwards) in one micro-batch")
    batch_max_wait_ms: float = Field(30.0, ge=0, description="longest a batch waits for requests being decoded "
                                     "or just answered (bounded; docs/serving.md)")
    batch_max_queued_images: int = Field(256, gt=0, description="queued rows beyond which classify answers 503")

    zero_shot_cache_size: int = Field(32, gt=0, description="label sets of /v1/zero-shot whose text features stay "
                                      "cached (least recently used dropped)")
    max_embedding_inputs: int = Field(256, gt=0, description="texts one /v1/embeddings request may embed "
                                      "(images: MAX_IMAGES_PER_REQUEST)")
    max_embedding_text_chars: int = Field(2000, gt=0, description="longest text /v1/embeddings takes (its tokens "
                                          "must also fit the text context)")

    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per line for app, "
                                                "access and library logs (with request id, route, tasks, status)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed to call the API from a browser, comma-separated "
        "('*' for any); empty: no CORS headers")

    host: str = "127.0.0.1"
    port: int = 8000

    @field_validator("admin_token", "classify_token")
    @classmethod
    def _not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty token would lock every client out (no bearer header can carry it): refuse to start instead.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("is set but empty: unset it, or set a long random token")
        return token

    @model_validator(mode="after")
    def _one_request_fits_the_body_budget(self) -> Settings:
        largest = max(self.max_classify_body_bytes, self.max_bundle_bytes)
        if self.max_inflight_body_bytes < largest:
            raise ValueError(f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must hold the largest request "
                             f"body ({largest} bytes), or such a request is never admitted")
        return self
    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return [o.strip() for o in value.split(",") if o.strip()] if isinstance(value, str) else value

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(model=self.model, pretrained=self.pretrained or None, device=self.device, seed=self.seed,
                            image_backend=self.image_backend, image_precision=self.image_precision,
                            onnx_cache_dir=self.onnx_cache_dir)

    def bundle_limits(self) -> BundleLimits:
        return BundleLimits(self.max_classes, self.max_classname_chars, self.max_template_chars, self.max_templates,
                            self.max_text_prompts)

    def request_memory_bound(self) -> int:
        """The most memory requests in progress can hold at once, beside the process and its model: the bodies
        admission lets in while they are parsed, and the images `decode_concurrency` requests decode."""
        largest = max(self.max_classify_body_bytes, self.max_bundle_bytes)
        bodies = min(self.max_inflight_requests * largest, self.max_inflight_body_bytes)
        return int(bodies * PARSE_FACTOR) + self.decode_concurrency * self.max_request_pixels * DECODE_BYTES_PER_PIXEL

    @property
    def max_classify_body_bytes(self) -> int:
        # Room for every allowed image plus multipart framing.
        return self.max_images_per_request * self.max_image_bytes + MiB


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """PROMPTSERVE_* variables that no setting reads, each with the setting it was probably meant to be."""
    known = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(k for k in environ if k.upper().startswith(PREFIX) and k.upper() not in known | CLIENT_VARIABLES)
    return [_with_suggestion(name, known) for name in unknown]


def _with_suggestion(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.6)
    return f"{name} (did you mean {close[0]}?)" if close else name
