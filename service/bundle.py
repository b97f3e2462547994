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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic_core
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from service.bitpack import packed_size, unpack_indices
from service.bonder import TGPTDims, tgpt_parameter_shapes
from service.manifest import (
    CLASS_TOKEN_POSITIONS,
    DEFAULT_TEMPLATES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CLASSNAME_CHARS,
    MAX_CONTEXT_ELEMENTS,
    BackboneRef,
    Manifest,
    MapleOptions,
    NoOptions,
    PromptLayout,
    QMapleOptions,
    QPromptOptions,
    RLPOptions,
    TGPTOptions,
    ZeroShotOptions,
    describe_input,
)

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_TOKEN_POSITIONS", "DEFAULT_TEMPLATES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_KEY",
    "MAX_CLASSNAME_CHARS", "METHODS", "BackboneRef", "Bundle", "BundleError", "Manifest", "PromptLayout",
    "decode_bundle", "encode_bundle", "fill_template", "read_bundle", "write_bundle",
]

MANIFEST_KEY = "promptserve.manifest"
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_ABS_VALUE = 1e4  # learned prompt values live near token-embedding scale; far larger ones only overflow
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class BundleError(ValueError):
    """A bundle violates the contract; `field` names the offending manifest field or tensor."""

    def __init__(self, field_name: str, problem: str):
        self.field = field_name
        self.problem = problem
        super().__init__(f"bundle field '{field_name}': {problem}")

    @classmethod
    def from_validation(cls, exc: ValidationError, prefix: str = "") -> BundleError:
        """The first problem pydantic found, named by its field path (list indexes dropped)."""
        first = exc.errors(include_url=False)[0]
        path = ".".join(str(part) for part in first["loc"] if isinstance(part, str))
        field_name = ".".join(p for p in (prefix, path) if p) or "manifest"
        problem = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("missing", "json_invalid", "value_error"):
            problem += f" (got {describe_input(first.get('input'))})"
        return cls(field_name, problem)


def fill_template(template: str, classname: str) -> str:
    """A validated template with its one `{}` replaced: no format-string syntax is ever interpreted."""
    return template.replace("{}", classname, 1)


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]

    @property
    def payload_bytes(self) -> int:
        """Bytes of learned tensor data (header excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def context(self, text: Any = None) -> torch.Tensor | None:
        """The plain float32 prompt context ([n_ctx, d] or [C, n_ctx, d]); None for methods without one.

        `text` (the backbone's PromptTextEncoder) is needed where the prompt is rebuilt from the backbone's own
        token embeddings (factorized RLP)."""
        return METHODS[self.manifest.method].context(self, text)

    def deep_text_prompts(self) -> torch.Tensor | None:
        """Float32 [J-1, n_ctx, d_t] prompts replacing the ctx rows before text blocks 1..J-1 (MaPLe); else None."""
        prompts = METHODS[self.manifest.method].text_prompts(self)
        return None if prompts is None else prompts[1:]

    def vision_prompts(self) -> torch.Tensor | None:
        """Float32 [J, n_ctx, d_v] merged vision prompts (MaPLe), for `service.vision_prompts`; else None."""
        return METHODS[self.manifest.method].vision_prompts(self)

    @property
    def vision_side(self) -> bool:
        """Whether this bundle changes the image forward (needs its own prompted image forward)."""
        return METHODS[self.manifest.method].vision_side


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


class OptionsCheck:
    """Validates a method's `options` with its typed model; `model` also feeds the published JSON Schema."""

    def __init__(self, model: type[BaseModel]):
        self.model = model

    def __call__(self, options: Mapping[str, Any]) -> None:
        try:
            self.model.model_validate(options, strict=True)
        except ValidationError as exc:
            raise BundleError.from_validation(exc, "options") from exc


# RLP bundles come in two forms (options.format): "merged" (a plain ctx, CoOp's tensors; bundles without a
# format are merged) and "factorized" (fp16 factors a [n_ctx, r] and b [r, d] plus options.ctx_init; the
# base prompt is that phrase's token embeddings, rebuilt from the backbone, so ctx = base + a·b).
RLP_FORMATS = ("merged", "factorized")

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


def _rlp_ctx(bundle: Bundle, text: Any = None) -> torch.Tensor:
    """Merged: the stored ctx. Factorized: base (the init phrase's embeddings) + a·b, in float32."""
    m, t = bundle.manifest, bundle.tensors
    if m.options.get("format", "merged") == "merged":
        return _plain_ctx(bundle)
    if text is None:
        raise ValueError("a factorized RLP prompt is rebuilt from the backbone's token embeddings: pass its text "
                         "encoder to Bundle.context")
    base = phrase_embeddings(text, m.options["ctx_init"], m.prompt.n_ctx)
    return base + t["a"].float() @ t["b"].float()


# TGP-T sizes in the manifest and their bounds; the backbone's own sizes are checked at activation.
TGPT_DIM_LIMITS = {"category_queries": 1024, "content_queries": 1024, "width": 4096, "embed_dim": 4096, "heads": 64}


def tgpt_dims(options: Mapping[str, Any]) -> TGPTDims:
    return TGPTDims(**{k: options[k] for k in TGPT_DIM_LIMITS})


def _tgpt_tensors(m: Manifest) -> dict[str, TensorRule]:
    """Queries, both Bonders and the head, named and shaped as `TGPTModel` itself (F16 or F32)."""
    shapes = tgpt_parameter_shapes(tgpt_dims(m.options), len(m.classnames))
    return {name: TensorRule(shape, ("F16", "F32")) for name, shape in shapes.items()}


_check_zeroshot_options = OptionsCheck(ZeroShotOptions)
_check_qprompt_options = OptionsCheck(QPromptOptions)
_no_options = OptionsCheck(NoOptions)
_check_maple_options = OptionsCheck(MapleOptions)
_check_qmaple_options = OptionsCheck(QMapleOptions)
_check_tgpt_options = OptionsCheck(TGPTOptions)
_check_rlp_options = OptionsCheck(RLPOptions)


def _maple_shapes(m: Manifest) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(text prompts [J, n, d_t], vision prompts [J, n, d_v]) of a MaPLe manifest."""
    depth, n = m.options["depth"], m.prompt.n_ctx
    return (depth, n, m.prompt.ctx_dim), (depth, n, m.options["vision_width"])


def _maple_tensors(m: Manifest) -> dict[str, TensorRule]:
    text, vision = _maple_shapes(m)
    return {"text_prompts": TensorRule(text, tuple(FLOAT_DTYPES)), "vision_prompts": TensorRule(vision, ("F16", "F32"))}


def _qmaple_tensors(m: Manifest) -> dict[str, TensorRule]:
    """Text prompts packed b-bit with one codebook and (mu, sigma) per depth row (one quantizer per tensor)."""
    (text, vision), bits = _maple_shapes(m), m.options["bits"]
    return {
        "indices": TensorRule((packed_size(bits, math.prod(text)),), ("U8",)),
        "codebook": TensorRule((text[0], 2**bits), ("F16", "F32")),
        "mu": TensorRule((text[0],), ("F32",)),
        "sigma": TensorRule((text[0],), ("F32",)),
        "vision_prompts": TensorRule(vision, ("F16", "F32")),
    }


def _plain_ctx(bundle: Bundle, text: Any = None) -> torch.Tensor:
    return bundle.tensors["ctx"].float()


def _dequantize(bundle: Bundle, shape: tuple[int, ...]) -> torch.Tensor:
    """W = sigma * codebook[index] + mu per group (the leading rows of `shape` split evenly into groups)."""
    t = bundle.tensors
    codebook = t["codebook"].float().reshape(-1, t["codebook"].shape[-1])
    groups = codebook.shape[0]
    indices = unpack_indices(t["indices"], bundle.manifest.options["bits"], math.prod(shape)).reshape(groups, -1)
    rows = torch.arange(groups)[:, None]
    return (t["sigma"].float()[:, None] * codebook[rows, indices] + t["mu"].float()[:, None]).reshape(shape)


def _dequantized_ctx(bundle: Bundle, text: Any = None) -> torch.Tensor:
    return _dequantize(bundle, _ctx_shape(bundle.manifest))


def _maple_text_prompts(bundle: Bundle) -> torch.Tensor:
    return bundle.tensors["text_prompts"].float()


def _qmaple_text_prompts(bundle: Bundle) -> torch.Tensor:
    return _dequantize(bundle, _maple_shapes(bundle.manifest)[0])


def _merged_vision_prompts(bundle: Bundle) -> torch.Tensor:
    return bundle.tensors["vision_prompts"].float()


def _none(bundle: Bundle, text: Any = None) -> None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    uses_context: bool
    tensor_rules: Callable[[Manifest], dict[str, TensorRule]]
    check_options: Callable[[Mapping[str, Any]], None]
    context: Callable[[Bundle, Any], torch.Tensor | None]
    # Deep (MaPLe) methods: all J text prompt rows (row 0 is the context), and the merged vision prompts.
    text_prompts: Callable[[Bundle], torch.Tensor | None] = _none
    vision_prompts: Callable[[Bundle], torch.Tensor | None] = _none
    # Image-conditioned (TGP-T) methods: prompts generated per image from its tokens; no class text is encoded.
    image_conditioned: bool = False

    @property
    def vision_side(self) -> bool:
        return self.vision_prompts is not _none

    @property
    def kind(self) -> str:
        """How the service runs it: "text" (cached class features, the shared image forward), "vision" (its own
        prompted image forward) or "image-conditioned" (prompts from the shared forward's image tokens)."""
        return "image-conditioned" if self.image_conditioned else "vision" if self.vision_side else "text"

    @property
    def needs_image_fingerprint(self) -> bool:
        """Vision-side and image-conditioned bundles depend on the image tower's weights."""
        return self.kind != "text"


METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(False, _no_tensors, _check_zeroshot_options, _none),
    "coop": MethodSpec(True, _plain_ctx_tensors, _no_options, _plain_ctx),
    "rlp": MethodSpec(True, _rlp_tensors, _check_rlp_options, _rlp_ctx),
    "qprompt": MethodSpec(True, _qprompt_tensors, _check_qprompt_options, _dequantized_ctx),
    "maple": MethodSpec(True, _maple_tensors, _check_maple_options, lambda b, text=None: _maple_text_prompts(b)[0],
                        _maple_text_prompts, _merged_vision_prompts),
    "qmaple": MethodSpec(True, _qmaple_tensors, _check_qmaple_options, lambda b, text=None: _qmaple_text_prompts(b)[0],
                         _qmaple_text_prompts, _merged_vision_prompts),
    "tgpt": MethodSpec(False, _tgpt_tensors, _check_tgpt_options, _none, image_conditioned=True),
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
    make_dirs(path.parent)
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
    fsync_dir(path.parent)


def make_dirs(path: Path) -> None:
    """mkdir -p, fsyncing each new directory's parent so the new entry survives a crash."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- reading -----------------------------------------------------------------------------------------


def read_bundle(path: str | os.PathLike) -> Bundle:
    return decode_bundle(Path(path).read_bytes())


def decode_bundle(data: bytes) -> Bundle:
    """Parse and fully validate a bundle from bytes (untrusted input).

    Order matters for cost: the manifest and the tensor header are checked (sizes included) before any
    tensor byte is materialized, and nothing here dequantizes a prompt.
    """
    header = _read_header(data)
    manifest = _parse_manifest(header.pop("__metadata__", None))
    rules = METHODS[manifest.method].tensor_rules(manifest)
    _check_header_tensors(header, rules)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the library reports offsets and lengths it cannot honour
        raise BundleError("tensors", f"tensor data is malformed ({exc})") from exc
    for name, t in tensors.items():
        _check_values(name, t)
    if "sigma" in tensors and not (tensors["sigma"] > 0).all():
        raise BundleError("sigma", "must be positive")
    return Bundle(manifest, tensors)


def _check_values(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        return
    if not torch.isfinite(tensor).all():
        raise BundleError(name, "contains NaN or infinite values")
    if tensor.numel() and tensor.abs().max().item() > MAX_ABS_VALUE:
        raise BundleError(name, f"values must lie within ±{MAX_ABS_VALUE:g} (larger ones overflow the encoder)")


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise BundleError("file", "too short to be a safetensors bundle")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise BundleError("file", "not a safetensors bundle (header length is out of range)")
    try:  # pydantic-core's parser bounds nesting depth, where json.loads would overflow the stack
        header = pydantic_core.from_json(data[8 : 8 + header_len])
    except ValueError as exc:
        raise BundleError("file", f"not a safetensors bundle (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise BundleError("file", "not a safetensors bundle (header is not a JSON object)")
    return header


class TensorEntry(BaseModel):
    """One tensor's safetensors header entry; checked before the library reads it."""

    model_config = ConfigDict(strict=True)

    dtype: str
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=8)]
    data_offsets: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]


def _check_header_tensors(header: Mapping[str, Any], rules: Mapping[str, TensorRule]) -> None:
    missing, extra = set(rules) - set(header), set(header) - set(rules)
    if missing:
        raise BundleError(sorted(missing)[0], "tensor is missing")
    if extra:
        raise BundleError(sorted(extra)[0], "tensor is not part of this method's bundle")
    for name, rule in rules.items():
        try:
            entry = TensorEntry.model_validate(header[name])
        except ValidationError as exc:
            raise BundleError(name, "tensor header entry is malformed") from exc
        if entry.dtype not in rule.dtypes:
            raise BundleError(name, f"dtype must be one of {list(rule.dtypes)}, got {describe_input(entry.dtype)}")
        if tuple(entry.shape) != rule.shape:
            raise BundleError(name, f"shape must be {list(rule.shape)}, got {entry.shape}")


_MANIFEST = TypeAdapter(Manifest)


def _parse_manifest(metadata: Any) -> Manifest:
    if not isinstance(metadata, dict) or not isinstance(metadata.get(MANIFEST_KEY), str):
        raise BundleError("manifest", f"missing: the safetensors metadata has no '{MANIFEST_KEY}' entry")
    text = metadata[MANIFEST_KEY]
    try:
        raw = pydantic_core.from_json(text)
    except ValueError as exc:
        raise BundleError("manifest", f"is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError("manifest", "must be a JSON object")
    _check_format(raw)
    unknown = set(raw) - set(Manifest.__dataclass_fields__)
    if unknown:
        log.warning("bundle manifest has unknown fields, ignored: %s", sorted(unknown)[:10])
    try:
        manifest = _MANIFEST.validate_json(text, strict=True)
    except ValidationError as exc:
        raise BundleError.from_validation(exc) from exc
    _check_method(manifest)
    return manifest


def _check_format(raw: Mapping[str, Any]) -> None:
    """Format first: a bundle of another format or version is named as such, not by its first odd field."""
    if raw.get("format") != FORMAT_NAME:
        raise BundleError("format", f"must be {FORMAT_NAME!r}, got {describe_input(raw.get('format'))}")
    version = raw.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BundleError("format_version", f"this reader handles 1..{FORMAT_VERSION}, got {describe_input(version)}")


def _check_method(manifest: Manifest) -> None:
    """The checks that span fields: the method exists, its prompt layout and its options."""
    spec = METHODS.get(manifest.method)
    if spec is None:
        raise BundleError("method", f"unknown method {manifest.method!r}; this reader knows {sorted(METHODS)}")
    layout = manifest.prompt
    if spec.uses_context and (layout.n_ctx < 1 or layout.ctx_dim < 1):
        raise BundleError("prompt.n_ctx", "this method needs n_ctx ≥ 1 and ctx_dim ≥ 1")
    if spec.uses_context and math.prod(_ctx_shape(manifest)) > MAX_CONTEXT_ELEMENTS:
        raise BundleError("prompt", f"the context would hold more than {MAX_CONTEXT_ELEMENTS} values")
    spec.check_options(manifest.options)
    if spec.needs_image_fingerprint and manifest.backbone.image_fingerprint is None:
        raise BundleError("backbone.image_fingerprint", f"is required: a {manifest.method} bundle depends on the "
                          "image tower")
    if spec.vision_side and (layout.class_specific or layout.class_token_position != "end"):
        raise BundleError("prompt.class_token_position", f"method {manifest.method!r} needs a shared context at 'end'")


# --- the published schema ----------------------------------------------------------------------------


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of the manifest, with each method's options schema attached by `if method == ...`."""
    schema = _MANIFEST.json_schema()
    definitions = schema.setdefault("$defs", {})
    rules = []
    for method, spec in sorted(METHODS.items()):
        model = getattr(spec.check_options, "model", NoOptions)
        options = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(options.pop("$defs", {}))
        definitions[model.__name__] = options
        rules.append({"if": {"properties": {"method": {"const": method}}},
                      "then": {"properties": {"options": {"$ref": f"#/$defs/{model.__name__}"}}}})
    schema["properties"]["method"]["enum"] = sorted(METHODS)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://promptserve.invalid/bundle-format.schema.json",
        "title": "promptserve bundle manifest",
        "description": f"The JSON object stored under '{MANIFEST_KEY}' in a bundle's safetensors metadata "
                       f"(format {FORMAT_NAME!r} version {FORMAT_VERSION}). Generated from service/manifest.py.",
        **schema,
        "allOf": rules,
    }


if __name__ == "__main__":  # python -m service.bundle > docs/bundle-format.schema.json
    print(json.dumps(manifest_json_schema(), indent=2, sort_keys=True))
