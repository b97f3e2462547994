"""The prompt bundle contract, shared by the trainer (writer) and the service (reader).

A bundle is one safetensors file. Its header's `__metadata__` holds a JSON manifest under
`MANIFEST_KEY`; its tensors hold only what a method learned. Nothing is ever unpickled: the header is
parsed as JSON with bounds checks before any tensor is materialized, and every violation raises a
`BundleError` that names the offending field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from service.bitpack import packed_size, unpack_indices
from service.bonder import TGPTDims, tgpt_parameter_shapes

log = logging.getLogger(__name__)

FORMAT_NAME = "promptserve.bundle"
FORMAT_VERSION = 1
MANIFEST_KEY = "promptserve.manifest"
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_CLASSNAME_CHARS = 200
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
DEFAULT_TEMPLATES = ("a photo of a {}.",)


class BundleError(ValueError):
    """A bundle violates the contract; `field` names the offending manifest field or tensor."""

    def __init__(self, field_name: str, problem: str):
        self.field = field_name
        super().__init__(f"bundle field '{field_name}': {problem}")


@dataclass(frozen=True)
class BackboneRef:
    """Which frozen backbone a bundle was trained for; `fingerprint` hashes its text-tower weights,
    `image_fingerprint` its image tower's (recorded by methods whose bundles depend on it)."""

    model: str
    pretrained: str | None
    fingerprint: str
    image_fingerprint: str | None = None


@dataclass(frozen=True)
class PromptLayout:
    """Where learned context vectors go: `n_ctx` slots of width `ctx_dim` around the class name.

    `class_specific` means one context per class (CoOp's CSC) instead of one shared by all classes.
    """

    n_ctx: int = 0
    ctx_dim: int = 0
    class_token_position: str = "end"
    class_specific: bool = False


@dataclass(frozen=True)
class Manifest:
    method: str
    backbone: BackboneRef
    classnames: tuple[str, ...]
    prompt: PromptLayout = PromptLayout()
    options: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    trainer_version: str | None = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]

    @property
    def payload_bytes(self) -> int:
        """Bytes of learned tensor data (header excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def context(self) -> torch.Tensor | None:
        """The plain float32 prompt context ([n_ctx, d] or [C, n_ctx, d]); None for methods without one."""
        return METHODS[self.manifest.method].context(self)


# --- per-method tensor rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRule:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def _ctx_shape(m: Manifest) -> tuple[int, ...]:
    p = m.prompt
    return (len(m.classnames), p.n_ctx, p.ctx_dim) if p.class_specific else (p.n_ctx, p.ctx_dim)


def _no_tensors(m: Manifest) -> dict[str, TensorRule]:
    return {}


def _plain_ctx_tensors(m: Manifest) -> dict[str, TensorRule]:
    return {"ctx": TensorRule(_ctx_shape(m), tuple(FLOAT_DTYPES))}


def _qprompt_tensors(m: Manifest) -> dict[str, TensorRule]:
    bits = m.options["bits"]
    count = math.prod(_ctx_shape(m))
    return {
        "indices": TensorRule((packed_size(bits, count),), ("U8",)),
        "codebook": TensorRule((2**bits,), ("F16", "F32")),
        "mu": TensorRule((1,), ("F32",)),
        "sigma": TensorRule((1,), ("F32",)),
    }


# TGP-T sizes in the manifest and their bounds; the backbone's own sizes are checked at activation.
TGPT_DIM_LIMITS = {"category_queries": 1024, "content_queries": 1024, "width": 4096, "embed_dim": 4096, "heads": 64}


def tgpt_dims(options: Mapping[str, Any]) -> TGPTDims:
    return TGPTDims(**{k: options[k] for k in TGPT_DIM_LIMITS})


def _tgpt_tensors(m: Manifest) -> dict[str, TensorRule]:
    """Queries, both Bonders and the head, named and shaped as `TGPTModel` itself (F16 or F32)."""
    shapes = tgpt_parameter_shapes(tgpt_dims(m.options), len(m.classnames))
    return {name: TensorRule(shape, ("F16", "F32")) for name, shape in shapes.items()}


def _check_tgpt_options(options: Mapping[str, Any]) -> None:
    for key, limit in TGPT_DIM_LIMITS.items():
        value = options.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise BundleError(f"options.{key}", f"must be an integer from 1 to {limit}, got {value!r}")
    if options["width"] % options["heads"]:
        raise BundleError("options.heads", f"must divide options.width {options['width']}, got {options['heads']}")


def _check_zeroshot_options(options: Mapping[str, Any]) -> None:
    templates = options.get("templates", list(DEFAULT_TEMPLATES))
    if not isinstance(templates, list) or not templates:
        raise BundleError("options.templates", "must be a non-empty list of strings")
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise BundleError("options.templates", f"each template needs exactly one '{{}}', got {t!r}")


def _check_qprompt_options(options: Mapping[str, Any]) -> None:
    bits = options.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise BundleError("options.bits", f"must be an integer from 1 to 8, got {bits!r}")


def _no_options(options: Mapping[str, Any]) -> None:
    return None


def _plain_ctx(bundle: Bundle) -> torch.Tensor:
    return bundle.tensors["ctx"].float()


def _dequantized_ctx(bundle: Bundle) -> torch.Tensor:
    """W = sigma * codebook[index] + mu: the quantized prompt back in its original space."""
    t, m = bundle.tensors, bundle.manifest
    shape = _ctx_shape(m)
    indices = unpack_indices(t["indices"], m.options["bits"], math.prod(shape))
    return (t["sigma"].float() * t["codebook"].float()[indices] + t["mu"].float()).reshape(shape)


@dataclass(frozen=True)
class MethodSpec:
    uses_context: bool
    tensor_rules: Callable[[Manifest], dict[str, TensorRule]]
    check_options: Callable[[Mapping[str, Any]], None]
    context: Callable[[Bundle], torch.Tensor | None]
    needs_image_fingerprint: bool = False


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(False, _no_tensors, _check_zeroshot_options, lambda b: None),
    "coop": MethodSpec(True, _plain_ctx_tensors, _no_options, _plain_ctx),
    "rlp": MethodSpec(True, _plain_ctx_tensors, _no_options, _plain_ctx),
    "qprompt": MethodSpec(True, _qprompt_tensors, _check_qprompt_options, _dequantized_ctx),
    "tgpt": MethodSpec(False, _tgpt_tensors, _check_tgpt_options, lambda b: None, needs_image_fingerprint=True),
}


# --- writing -----------------------------------------------------------------------------------------


def encode_bundle(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a bundle after checking it against the contract (so nothing invalid is ever written)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = safetensors.torch.save(tensors, metadata={MANIFEST_KEY: manifest.to_json()})
    decode_bundle(data)
    return data


def write_bundle(path: str | os.PathLike, manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write a bundle atomically (temp file, fsync, rename); returns its size in bytes."""
    data = encode_bundle(manifest, tensors)
    atomic_write(Path(path), data)
    return len(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Readers see either the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- reading -----------------------------------------------------------------------------------------


def read_bundle(path: str | os.PathLike) -> Bundle:
    return decode_bundle(Path(path).read_bytes())


def decode_bundle(data: bytes) -> Bundle:
    """Parse and fully validate a bundle from bytes (untrusted input)."""
    header = _read_header(data)
    manifest = _parse_manifest(header.pop("__metadata__", None))
    spec = METHODS[manifest.method]
    rules = spec.tensor_rules(manifest)
    _check_header_tensors(header, rules)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the library reports offsets and lengths it cannot honour
        raise BundleError("tensors", f"tensor data is malformed ({exc})") from exc
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise BundleError(name, "contains NaN or infinite values")
    if "sigma" in tensors and not (tensors["sigma"] > 0).all():
        raise BundleError("sigma", "must be positive")
    return Bundle(manifest, tensors)


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise BundleError("file", "too short to be a safetensors bundle")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise BundleError("file", "not a safetensors bundle (header length is out of range)")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError("file", f"not a safetensors bundle (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BundleError("file", "not a safetensors bundle (header is not a JSON object)")
    return header


def _check_header_tensors(header: Mapping[str, Any], rules: Mapping[str, TensorRule]) -> None:
    missing, extra = set(rules) - set(header), set(header) - set(rules)
    if missing:
        raise BundleError(sorted(missing)[0], "tensor is missing")
    if extra:
        raise BundleError(sorted(extra)[0], "tensor is not part of this method's bundle")
    for name, rule in rules.items():
        entry = header[name]
        if not isinstance(entry, dict):
            raise BundleError(name, "tensor header entry is malformed")
        if entry.get("dtype") not in rule.dtypes:
            raise BundleError(name, f"dtype must be one of {list(rule.dtypes)}, got {entry.get('dtype')!r}")
        if tuple(entry.get("shape", ())) != rule.shape:
            raise BundleError(name, f"shape must be {list(rule.shape)}, got {entry.get('shape')}")


def _parse_manifest(metadata: Any) -> Manifest:
    if not isinstance(metadata, dict) or MANIFEST_KEY not in metadata:
        raise BundleError("manifest", f"missing: the safetensors metadata has no '{MANIFEST_KEY}' entry")
    try:
        raw = json.loads(metadata[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise BundleError("manifest", f"is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError("manifest", "must be a JSON object")
    _check_format(raw)
    unknown = set(raw) - {f for f in Manifest.__dataclass_fields__}
    if unknown:
        log.warning("bundle manifest has unknown fields, ignored: %s", sorted(unknown))
    method = _require(raw, "method", str)
    if method not in METHODS:
        raise BundleError("method", f"unknown method {method!r}; this reader knows {sorted(METHODS)}")
    manifest = Manifest(
        method=method,
        backbone=_parse_backbone(_require(raw, "backbone", dict)),
        classnames=_parse_classnames(_require(raw, "classnames", list)),
        prompt=_parse_prompt(raw.get("prompt", {}), METHODS[method].uses_context),
        options=_optional(raw, "options", dict),
        metrics=_optional(raw, "metrics", dict),
        created=_require(raw, "created", str),
        trainer_version=raw.get("trainer_version"),
    )
    METHODS[method].check_options(manifest.options)
    if METHODS[method].needs_image_fingerprint and manifest.backbone.image_fingerprint is None:
        raise BundleError("backbone.image_fingerprint", f"is required: a {method} bundle depends on the image tower")
    return manifest


def _check_format(raw: Mapping[str, Any]) -> None:
    if raw.get("format") != FORMAT_NAME:
        raise BundleError("format", f"must be {FORMAT_NAME!r}, got {raw.get('format')!r}")
    version = raw.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise BundleError("format_version", f"this reader handles 1..{FORMAT_VERSION}, got {version!r}")


def _require(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind):
        raise BundleError(key, f"must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _optional(raw: Mapping[str, Any], key: str, kind: type) -> Any:
    return _require(raw, key, kind) if key in raw else kind()


def _parse_backbone(raw: Mapping[str, Any]) -> BackboneRef:
    model = raw.get("model")
    fingerprint = raw.get("fingerprint")
    pretrained = raw.get("pretrained")
    if not isinstance(model, str) or not model:
        raise BundleError("backbone.model", "must be a non-empty open_clip model name")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise BundleError("backbone.fingerprint", "must be a non-empty string")
    if pretrained is not None and not isinstance(pretrained, str):
        raise BundleError("backbone.pretrained", "must be a string or null")
    image_fingerprint = raw.get("image_fingerprint")
    if image_fingerprint is not None and (not isinstance(image_fingerprint, str) or not image_fingerprint):
        raise BundleError("backbone.image_fingerprint", "must be a non-empty string or null")
    return BackboneRef(model, pretrained, fingerprint, image_fingerprint)


def _parse_classnames(raw: list[Any]) -> tuple[str, ...]:
    if not raw:
        raise BundleError("classnames", "must name at least one class")
    for name in raw:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_CLASSNAME_CHARS:
            raise BundleError("classnames", f"each must be a non-empty string of ≤ {MAX_CLASSNAME_CHARS} chars")
    if len(set(raw)) != len(raw):
        duplicate = next(n for n in raw if raw.count(n) > 1)
        raise BundleError("classnames", f"duplicate class {duplicate!r}")
    return tuple(raw)


def _parse_prompt(raw: Any, uses_context: bool) -> PromptLayout:
    if not isinstance(raw, dict):
        raise BundleError("prompt", "must be a JSON object")
    layout = PromptLayout(
        n_ctx=raw.get("n_ctx", 0),
        ctx_dim=raw.get("ctx_dim", 0),
        class_token_position=raw.get("class_token_position", "end"),
        class_specific=raw.get("class_specific", False),
    )
    for key in ("n_ctx", "ctx_dim"):
        value = getattr(layout, key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 4096:
            raise BundleError(f"prompt.{key}", f"must be an integer in [0, 4096], got {value!r}")
    if uses_context and (layout.n_ctx < 1 or layout.ctx_dim < 1):
        raise BundleError("prompt.n_ctx", "this method needs n_ctx ≥ 1 and ctx_dim ≥ 1")
    if layout.class_token_position not in CLASS_TOKEN_POSITIONS:
        raise BundleError("prompt.class_token_position", f"must be one of {list(CLASS_TOKEN_POSITIONS)}")
    if not isinstance(layout.class_specific, bool):
        raise BundleError("prompt.class_specific", "must be true or false")
    return layout
