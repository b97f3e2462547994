"""The prompt bundle contract, shared by the trainer (writer) and the service (reader).

A bundle is one safetensors file. Its header's `__metadata__` holds a JSON manifest under
`MANIFEST_KEY`; its tensors hold only what a method learned. Nothing is ever unpickled: the header is
parsed as JSON with bounds checks before any tensor is materialized, and every violation raises a
`BundleError` that names the offending field. The header and manifest half, which needs no torch, is
`service.bundle_header`; this module adds the tensors (per-method rules, dtypes, shapes, values).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import TypeAdapter

from service.bitpack import packed_size, unpack_indices
from service.bonder import TGPTDims, tgpt_parameter_shapes
from service.bundle_header import (
    MANIFEST_KEY,
    METHOD_INFO,
    BundleError,
    MethodInfo,
    ctx_shape,
    decode_header,
    maple_shapes,
    tensor_entry,
)
from service.manifest import (
    CLASS_TOKEN_POSITIONS,
    DEFAULT_TEMPLATES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CLASSNAME_CHARS,
    BackboneRef,
    Manifest,
    PromptLayout,
    describe_input,
)

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_TOKEN_POSITIONS", "DEFAULT_TEMPLATES", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_KEY",
    "MAX_CLASSNAME_CHARS", "METHODS", "BackboneRef", "Bundle", "BundleError", "Manifest", "PromptLayout",
    "decode_bundle", "encode_bundle", "fill_template", "read_bundle", "write_bundle",
]

MAX_ABS_VALUE = 1e4  # learned prompt values live near token-embedding scale; far larger ones only overflow
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


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


def _no_tensors(m: Manifest) -> dict[str, TensorRule]:
    return {}


def _plain_ctx_tensors(m: Manifest) -> dict[str, TensorRule]:
    return {"ctx": TensorRule(ctx_shape(m), tuple(FLOAT_DTYPES))}


def _qprompt_tensors(m: Manifest) -> dict[str, TensorRule]:
    bits = m.options["bits"]
    count = math.prod(ctx_shape(m))
    return {
        "indices": TensorRule((packed_size(bits, count),), ("U8",)),
        "codebook": TensorRule((2**bits,), ("F16", "F32")),
        "mu": TensorRule((1,), ("F32",)),
        "sigma": TensorRule((1,), ("F32",)),
    }


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


def _maple_tensors(m: Manifest) -> dict[str, TensorRule]:
    text, vision = maple_shapes(m)
    return {"text_prompts": TensorRule(text, tuple(FLOAT_DTYPES)), "vision_prompts": TensorRule(vision, ("F16", "F32"))}


def _qmaple_tensors(m: Manifest) -> dict[str, TensorRule]:
    """Text prompts packed b-bit with one codebook and (mu, sigma) per depth row (one quantizer per tensor)."""
    (text, vision), bits = maple_shapes(m), m.options["bits"]
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
    return _dequantize(bundle, ctx_shape(bundle.manifest))


def _maple_text_prompts(bundle: Bundle) -> torch.Tensor:
    return bundle.tensors["text_prompts"].float()


def _qmaple_text_prompts(bundle: Bundle) -> torch.Tensor:
    return _dequantize(bundle, maple_shapes(bundle.manifest)[0])


def _merged_vision_prompts(bundle: Bundle) -> torch.Tensor:
    return bundle.tensors["vision_prompts"].float()


def _none(bundle: Bundle, text: Any = None) -> None:
    return None


@dataclass(frozen=True)
class MethodSpec:
    """A method's bundle side: its manifest facts (`info`, torch-free, from `METHOD_INFO`) and its tensors."""

    info: MethodInfo
    tensor_rules: Callable[[Manifest], dict[str, TensorRule]]
    context: Callable[[Bundle, Any], torch.Tensor | None]
    # Deep (MaPLe) methods: all J text prompt rows (row 0 is the context), and the merged vision prompts.
    text_prompts: Callable[[Bundle], torch.Tensor | None] = _none
    vision_prompts: Callable[[Bundle], torch.Tensor | None] = _none

    def __post_init__(self) -> None:
        if self.info.vision_side != (self.vision_prompts is not _none):
            raise TypeError("a method has vision prompts exactly when its MethodInfo says vision_side")

    @property
    def uses_context(self) -> bool:
        return self.info.uses_context

    @property
    def vision_side(self) -> bool:
        return self.info.vision_side

    @property
    def image_conditioned(self) -> bool:
        return self.info.image_conditioned

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def needs_image_fingerprint(self) -> bool:
        return self.info.needs_image_fingerprint


# One entry per name of METHOD_INFO (a test holds the two name sets equal).
METHODS: dict[str, MethodSpec] = {
    "zeroshot": MethodSpec(METHOD_INFO["zeroshot"], _no_tensors, _none),
    "coop": MethodSpec(METHOD_INFO["coop"], _plain_ctx_tensors, _plain_ctx),
    "rlp": MethodSpec(METHOD_INFO["rlp"], _rlp_tensors, _rlp_ctx),
    "qprompt": MethodSpec(METHOD_INFO["qprompt"], _qprompt_tensors, _dequantized_ctx),
    "maple": MethodSpec(METHOD_INFO["maple"], _maple_tensors, lambda b, text=None: _maple_text_prompts(b)[0],
                        _maple_text_prompts, _merged_vision_prompts),
    "qmaple": MethodSpec(METHOD_INFO["qmaple"], _qmaple_tensors, lambda b, text=None: _qmaple_text_prompts(b)[0],
                         _qmaple_text_prompts, _merged_vision_prompts),
    "tgpt": MethodSpec(METHOD_INFO["tgpt"], _tgpt_tensors, _none),
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
    header = decode_header(data)
    manifest = header.manifest
    _check_header_tensors(header.tensors, METHODS[manifest.method].tensor_rules(manifest))
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


def _check_header_tensors(header: Mapping[str, Any], rules: Mapping[str, TensorRule]) -> None:
    missing, extra = set(rules) - set(header), set(header) - set(rules)
    if missing:
        raise BundleError(sorted(missing)[0], "tensor is missing")
    if extra:
        raise BundleError(sorted(extra)[0], "tensor is not part of this method's bundle")
    for name, rule in rules.items():
        entry = tensor_entry(name, header[name])
        if entry.dtype not in rule.dtypes:
            raise BundleError(name, f"dtype must be one of {list(rule.dtypes)}, got {describe_input(entry.dtype)}")
        if tuple(entry.shape) != rule.shape:
            raise BundleError(name, f"shape must be {list(rule.shape)}, got {entry.shape}")


# --- the published schema ----------------------------------------------------------------------------


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of the manifest, with each method's options schema attached by `if method == ...`."""
    schema = TypeAdapter(Manifest).json_schema()
    definitions = schema.setdefault("$defs", {})
    rules = []
    for method, info in sorted(METHOD_INFO.items()):
        model = info.options
        options = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(options.pop("$defs", {}))
        definitions[model.__name__] = options
        rules.append({"if": {"properties": {"method": {"const": method}}},
                      "then": {"properties": {"options": {"$ref": f"#/$defs/{model.__name__}"}}}})
    schema["properties"]["method"]["enum"] = sorted(METHOD_INFO)
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
