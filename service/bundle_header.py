"""A bundle's header, read without torch: the safetensors header, the manifest it carries and the checks that
need no tensor (format, method, prompt layout, options), plus the torch-free half of the method table.

`service.bundle.decode_bundle` starts here and then checks the tensors themselves (names, dtypes and shapes
per method, finite values); `promptserve-train inspect` stops here, so it answers without loading torch.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from service.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_CONTEXT_ELEMENTS,
    Manifest,
    MapleOptions,
    NoOptions,
    QMapleOptions,
    QPromptOptions,
    RLPOptions,
    TGPTOptions,
    ZeroShotOptions,
    describe_input,
)

log = logging.getLogger(__name__)

MANIFEST_KEY = "promptserve.manifest"
MAX_HEADER_BYTES = 8 * 1024 * 1024
# safetensors dtype names as torch spells them (what `str(tensor.dtype)` prints)
TORCH_DTYPE_NAMES = {"BOOL": "torch.bool", "U8": "torch.uint8", "I8": "torch.int8", "I16": "torch.int16",
                     "U16": "torch.uint16", "I32": "torch.int32", "U32": "torch.uint32", "I64": "torch.int64",
                     "U64": "torch.uint64", "F16": "torch.float16", "BF16": "torch.bfloat16", "F32": "torch.float32",
                     "F64": "torch.float64"}


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


# --- the method table, torch-free half (service.bundle.METHODS adds each method's tensors) --------------


@dataclass(frozen=True)
class MethodInfo:
    uses_context: bool
    options: type[BaseModel]  # validates the manifest's `options`; also feeds the published JSON Schema
    vision_side: bool = False  # deep prompts in the image tower (MaPLe): its own prompted image forward
    image_conditioned: bool = False  # prompts generated per image from its tokens (TGP-T); no class text encoded

    @property
    def kind(self) -> str:
        """How the service runs it: "text" (cached class features, the shared image forward), "vision" (its own
        prompted image forward) or "image-conditioned" (prompts from the shared forward's image tokens)."""
        return "image-conditioned" if self.image_conditioned else "vision" if self.vision_side else "text"

    @property
    def needs_image_fingerprint(self) -> bool:
        """Vision-side and image-conditioned bundles depend on the image tower's weights."""
        return self.kind != "text"

    def check_options(self, options: Mapping[str, Any]) -> None:
        try:
            self.options.model_validate(options, strict=True)
        except ValidationError as exc:
            raise BundleError.from_validation(exc, "options") from exc


METHOD_INFO: dict[str, MethodInfo] = {
    "zeroshot": MethodInfo(False, ZeroShotOptions),
    "coop": MethodInfo(True, NoOptions),
    "rlp": MethodInfo(True, RLPOptions),
    "qprompt": MethodInfo(True, QPromptOptions),
    "maple": MethodInfo(True, MapleOptions, vision_side=True),
    "qmaple": MethodInfo(True, QMapleOptions, vision_side=True),
    "tgpt": MethodInfo(False, TGPTOptions, image_conditioned=True),
}


def ctx_shape(m: Manifest) -> tuple[int, ...]:
    """The plain context's shape: [n_ctx, d], or [C, n_ctx, d] for a class-specific one."""
    p = m.prompt
    return (len(m.classnames), p.n_ctx, p.ctx_dim) if p.class_specific else (p.n_ctx, p.ctx_dim)


def maple_shapes(m: Manifest) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(text prompts [J, n, d_t], vision prompts [J, n, d_v]) of a MaPLe manifest."""
    depth, n = m.options["depth"], m.prompt.n_ctx
    return (depth, n, m.prompt.ctx_dim), (depth, n, m.options["vision_width"])


# --- the header --------------------------------------------------------------------------------------


class TensorEntry(BaseModel):
    """One tensor's safetensors header entry; checked before the library reads it."""

    model_config = ConfigDict(strict=True)

    dtype: str
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=8)]
    data_offsets: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]

    @field_validator("data_offsets")
    @classmethod
    def _begin_before_end(cls, offsets: list[int]) -> list[int]:
        if offsets[0] > offsets[1]:
            raise ValueError("data_offsets must be [begin, end] with begin ≤ end")
        return offsets


@dataclass(frozen=True)
class BundleHeader:
    """A bundle's validated manifest and the raw header entries of its tensors (name → safetensors entry)."""

    manifest: Manifest
    tensors: Mapping[str, Any]

    def entries(self) -> dict[str, TensorEntry]:
        """Each tensor's header entry, checked for form (not against the method's rules)."""
        return {name: tensor_entry(name, raw) for name, raw in self.tensors.items()}

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data the header declares (the spans of its data_offsets)."""
        return sum(end - start for start, end in (e.data_offsets for e in self.entries().values()))


def decode_header(data: bytes) -> BundleHeader:
    """The manifest and tensor entries of a bundle's bytes (untrusted), with every check that needs no tensor."""
    header = read_header(data)
    manifest = parse_manifest(header.pop("__metadata__", None))
    return BundleHeader(manifest, header)


def read_header(data: bytes) -> dict[str, Any]:
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


def tensor_entry(name: str, raw: Any) -> TensorEntry:
    try:
        return TensorEntry.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(name, "tensor header entry is malformed") from exc


_MANIFEST = TypeAdapter(Manifest)


def parse_manifest(metadata: Any) -> Manifest:
    if not isinstance(metadata, dict) or not isinstance(metadata.get(MANIFEST_KEY), str):
        raise BundleError("manifest", f"missing: the safetensors metadata has no '{MANIFEST_KEY}' entry")
    text = metadata[MANIFEST_KEY]
    try:
        raw = pydantic_core.from_json(text)
    except ValueError as exc:
        raise BundleError("manifest", f"is not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise BundleError("manifest", "must be a JSON object")
    check_format(raw)
    unknown = set(raw) - set(Manifest.__dataclass_fields__)
    if unknown:
        log.warning("bundle manifest has unknown fields, ignored: %s", sorted(unknown)[:10])
    try:
        manifest = _MANIFEST.validate_json(text, strict=True)
    except ValidationError as exc:
        raise BundleError.from_validation(exc) from exc
    check_method(manifest)
    return manifest


def check_format(raw: Mapping[str, Any]) -> None:
    """Format first: a bundle of another format or version is named as such, not by its first odd field."""
    if raw.get("format") != FORMAT_NAME:
        raise BundleError("format", f"must be {FORMAT_NAME!r}, got {describe_input(raw.get('format'))}")
    version = raw.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BundleError("format_version", f"this reader handles 1..{FORMAT_VERSION}, got {describe_input(version)}")


def check_method(manifest: Manifest) -> None:
    """The checks that span fields: the method exists, its prompt layout and its options."""
    info = METHOD_INFO.get(manifest.method)
    if info is None:
        raise BundleError("method", f"unknown method {manifest.method!r}; this reader knows {sorted(METHOD_INFO)}")
    layout = manifest.prompt
    if info.uses_context and (layout.n_ctx < 1 or layout.ctx_dim < 1):
        raise BundleError("prompt.n_ctx", "this method needs n_ctx ≥ 1 and ctx_dim ≥ 1")
    if info.uses_context and math.prod(ctx_shape(manifest)) > MAX_CONTEXT_ELEMENTS:
        raise BundleError("prompt", f"the context would hold more than {MAX_CONTEXT_ELEMENTS} values")
    info.check_options(manifest.options)
    if info.needs_image_fingerprint and manifest.backbone.image_fingerprint is None:
        raise BundleError("backbone.image_fingerprint", f"is required: a {manifest.method} bundle depends on the "
                          "image tower")
    if info.vision_side and (layout.class_specific or layout.class_token_position != "end"):
        raise BundleError("prompt.class_token_position", f"method {manifest.method!r} needs a shared context at 'end'")
