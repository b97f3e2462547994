"""A bundle's header, read without torch: the safetensors header, the manifest it carries, the method's typed
options and every check that needs no tensor (format, method, prompt layout, options).

`service.bundle.codec.decode_bundle` starts here and then checks the tensors themselves (names, dtypes and
shapes per method, finite values); `promptserve-train inspect` stops here, so it answers without loading torch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from service.bundle.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest
from service.core.records import PromptLayout
from service.methods import METHODS, BundleError, MethodSpec
from service.methods.spec import describe_input

log = logging.getLogger(__name__)

MANIFEST_KEY = "promptserve.manifest"
MAX_HEADER_BYTES = 8 * 1024 * 1024
# safetensors dtype names as torch spells them (what `str(tensor.dtype)` prints)
TORCH_DTYPE_NAMES = {"BOOL": "torch.bool", "U8": "torch.uint8", "I8": "torch.int8", "I16": "torch.int16",
                     "U16": "torch.uint16", "I32": "torch.int32", "U32": "torch.uint32", "I64": "torch.int64",
                     "U64": "torch.uint64", "F16": "torch.float16", "BF16": "torch.bfloat16", "F32": "torch.float32",
                     "F64": "torch.float64"}


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


class ManifestFacts:
    """What a method's rules read from a bundle's manifest (shared by `BundleHeader` and the decoded `Bundle`)."""

    manifest: Manifest

    @property
    def spec(self) -> MethodSpec[Any]:
        return METHODS[self.manifest.method]

    @property
    def classnames(self) -> tuple[str, ...]:
        return self.manifest.classnames

    @property
    def prompt(self) -> PromptLayout:
        return self.manifest.prompt


@dataclass(frozen=True)
class BundleHeader(ManifestFacts):
    """A bundle's validated manifest, its method's typed options, and the raw header entries of its tensors."""

    manifest: Manifest
    options: BaseModel
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
    return BundleHeader(manifest, check_method(manifest), header)


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
    """The manifest in a safetensors metadata mapping, checked against the schema (not yet its method's rules)."""
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
        return _MANIFEST.validate_json(text, strict=True)
    except ValidationError as exc:
        raise BundleError.from_validation(exc) from exc


def check_format(raw: Mapping[str, Any]) -> None:
    """Format first: a bundle of another format or version is named as such, not by its first odd field."""
    if raw.get("format") != FORMAT_NAME:
        raise BundleError("format", f"must be {FORMAT_NAME!r}, got {describe_input(raw.get('format'))}")
    version = raw.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise BundleError("format_version", f"this reader handles 1..{FORMAT_VERSION}, got {describe_input(version)}")


def check_method(manifest: Manifest) -> BaseModel:
    """The checks that span fields: the method exists, its options and its own rules; returns the typed options."""
    spec = METHODS.get(manifest.method)
    if spec is None:
        raise BundleError("method", f"unknown method {manifest.method!r}; this reader knows {sorted(METHODS)}")
    options = spec.parse_options(manifest.options)
    if spec.kind.needs_image_fingerprint and manifest.backbone.image_fingerprint is None:
        raise BundleError("backbone.image_fingerprint", f"is required: a {manifest.method} bundle depends on the "
                          "image tower")
    spec.check(BundleHeader(manifest, options, {}))
    return options
