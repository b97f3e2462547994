"""The prompt bundle contract, shared by the trainer (writer) and the service (reader).

A bundle is one safetensors file. Its header's `__metadata__` holds a JSON manifest under `MANIFEST_KEY`; its
tensors hold only what a method learned. Nothing is ever unpickled: the header is parsed as JSON with bounds
checks before any tensor is materialized (`service.bundle.header`, torch-free), and every violation raises a
`BundleError` that names the offending field. This module adds the tensors: the method's rules (names, dtypes,
shapes), finite values, and what a method makes of them (`Bundle.class_prompt`, `vision_prompts`,
`image_model`, each its method spec's decoder).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from pydantic import BaseModel

from service.bundle.header import MANIFEST_KEY, ManifestFacts, decode_header, tensor_entry
from service.bundle.manifest import Manifest
from service.core.fsio import atomic_write
from service.methods import BundleError, ClassPrompt, TensorRule
from service.methods.spec import describe_input

if TYPE_CHECKING:
    from service.core.bonder import TGPTModel
    from service.core.text_encoder import PromptTextEncoder

MAX_ABS_VALUE = 1e4  # learned prompt values live near token-embedding scale; far larger ones only overflow


@dataclass(frozen=True)
class Bundle(ManifestFacts):
    """A bundle's manifest and its tensors (checked by `decode_bundle`, or just exported by a learner)."""

    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]

    @functools.cached_property
    def options(self) -> BaseModel:
        """The manifest's options as the method's typed model."""
        return self.spec.parse_options(self.manifest.options)

    @property
    def payload_bytes(self) -> int:
        """Bytes of learned tensor data (header excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def class_prompt(self, text: PromptTextEncoder | None = None) -> ClassPrompt | None:
        """The learned prompt class names are encoded with (float32); None for templates or no class text.
        `text` is the serving backbone's encoder: a factorized RLP prompt is rebuilt from its token embeddings."""
        return self.spec.class_prompt(self, text)

    def vision_prompts(self) -> torch.Tensor | None:
        """Float32 [J, n_ctx, d_v] merged vision prompts (vision-side methods); else None."""
        return self.spec.vision_prompts(self)

    def image_model(self) -> TGPTModel:
        """The per-image prompt model of an image-conditioned method (float32, eval mode)."""
        return self.spec.image_model(self)

    def with_classnames(self, classnames: tuple[str, ...]) -> Bundle:
        """The same learned prompt applied to other classes (how novel classes are scored)."""
        refusal = self.spec.novel_classes_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        if self.manifest.prompt.class_specific:
            raise ValueError("a class-specific context cannot be applied to other classes")
        return Bundle(dataclasses.replace(self.manifest, classnames=tuple(classnames)), self.tensors)


# --- writing -----------------------------------------------------------------------------------------


def encode_bundle(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a bundle after checking it against the contract (so nothing invalid is ever written)."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    data = safetensors.torch.save(dict(tensors), metadata={MANIFEST_KEY: manifest.to_json()})
    decode_bundle(data)
    return data


def write_bundle(path: str | os.PathLike[str], manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write a bundle atomically (temp file, fsync, rename); returns its size in bytes."""
    data = encode_bundle(manifest, tensors)
    atomic_write(Path(path), data)
    return len(data)


# --- reading -----------------------------------------------------------------------------------------


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    return decode_bundle(Path(path).read_bytes())


def decode_bundle(data: bytes) -> Bundle:
    """Parse and fully validate a bundle from bytes (untrusted input).

    Order matters for cost: the manifest and the tensor header are checked (sizes included) before any
    tensor byte is materialized, and nothing here dequantizes a prompt.
    """
    header = decode_header(data)
    _check_header_tensors(header.tensors, header.spec.tensor_rules(header))
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the library reports offsets and lengths it cannot honour
        raise BundleError("tensors", f"tensor data is malformed ({exc})") from exc
    for name, t in tensors.items():
        _check_values(name, t)
    if "sigma" in tensors and not (tensors["sigma"] > 0).all():
        raise BundleError("sigma", "must be positive")
    return Bundle(header.manifest, tensors)


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
