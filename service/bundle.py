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
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from service.bitpack import packed_size, unpack_indices

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
    """Which frozen backbone a bundle was trained for; `fingerprint` hashes its text-tower weights."""

    model: str
    pretrained: str | None
    fingerprint: str


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


# RLP bundles come in two forms (options.format): "merged" (a plain ctx, CoOp's tensors; bundles without a
# format are merged) and "factorized" (fp16 factors a [n_ctx, r] and b [r, d] plus options.ctx_init; the
# base prompt is that phrase's token embeddings, rebuilt from the backbone, so ctx = base + a·b).
RLP_FORMATS = ("merged", "factorized")

# Text towers (PromptTextEncoder) loaded in this process, held weakly, by text-tower fingerprint (a set: several
# backbones may share weights and come and go). The factorized RLP form rebuilds its base prompt from a tower
# its fingerprint names; a served bundle's fingerprint has already been matched to the serving backbone
# (service.tasks.check_compatible).
TEXT_TOWERS: dict[str, weakref.WeakSet] = {}


def register_text_tower(fingerprint: str, encoder: Any) -> None:
    TEXT_TOWERS.setdefault(fingerprint, weakref.WeakSet()).add(encoder)


def phrase_embeddings(encoder: Any, text: str, n_ctx: int) -> torch.Tensor:
    """Token embeddings [n_ctx, d] (float32, CPU) of `text`, which must be exactly `n_ctx` tokens."""
    ids = encoder.tokenizer.encode(text)
    if len(ids) != n_ctx:
        raise BundleError("options.ctx_init", f"{text!r} is {len(ids)} tokens, the prompt has n_ctx={n_ctx}")
    embedding = encoder.tower.token_embedding
    return embedding(torch.tensor(ids, device=embedding.weight.device)).detach().float().cpu()


def _rlp_tensors(m: Manifest) -> dict[str, TensorRule]:
    if m.options.get("format", "merged") == "merged":
        return _plain_ctx_tensors(m)
    rank, p = m.options["rank"], m.prompt
    if p.class_specific:
        raise BundleError("prompt.class_specific", "the factorized RLP form has one context shared by all classes")
    return {"a": TensorRule((p.n_ctx, rank), ("F16", "F32")), "b": TensorRule((rank, p.ctx_dim), ("F16", "F32"))}


def _check_rlp_options(options: Mapping[str, Any]) -> None:
    form = options.get("format", "merged")
    if form not in RLP_FORMATS:
        raise BundleError("options.format", f"must be one of {list(RLP_FORMATS)}, got {form!r}")
    if form == "merged":
        return
    rank, phrase = options.get("rank"), options.get("ctx_init")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 4096:
        raise BundleError("options.rank", f"must be an integer from 1 to 4096, got {rank!r}")
    if not isinstance(phrase, str) or not phrase.strip() or len(phrase) > MAX_CLASSNAME_CHARS:
        raise BundleError("options.ctx_init", f"must be a non-empty phrase of ≤ {MAX_CLASSNAME_CHARS} chars")


def _rlp_ctx(bundle: Bundle) -> torch.Tensor:
    """Merged: the stored ctx. Factorized: base (the init phrase's embeddings) + a·b, in float32."""
    m, t = bundle.manifest, bundle.tensors
    if m.options.get("format", "merged") == "merged":
        return _plain_ctx(bundle)
    encoder = next(iter(TEXT_TOWERS.get(m.backbone.fingerprint, ())), None)
    if encoder is None:
        raise BundleError("backbone.fingerprint", "no loaded text tower has these weights to rebuild the RLP prompt")
    base = phrase_embeddings(encoder, m.options["ctx_init"], m.prompt.n_ctx)
    return base + t["a"].float() @ t["b"].float()


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


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(False, _no_tensors, _check_zeroshot_options, lambda b: None),
    "coop": MethodSpec(True, _plain_ctx_tensors, _no_options, _plain_ctx),
    "rlp": MethodSpec(True, _rlp_tensors, _check_rlp_options, _rlp_ctx),
    "qprompt": MethodSpec(True, _qprompt_tensors, _check_qprompt_options, _dequantized_ctx),
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
    return BackboneRef(model, pretrained, fingerprint)


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
