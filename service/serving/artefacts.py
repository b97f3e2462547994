"""Stored artefacts: a version's class text features, computed once per fleet and kept beside it in the registry.

An artefact is a safetensors file: `text_features` [C, D] float32, and metadata naming what it was computed from
(the bundle's sha256, the text tower's fingerprint and the precision it computes in) with a sha256 checksum of
the tensor bytes. Its registry key is a hash of the fingerprint and precision, so a replica on another backbone
or precision never finds another's features; the image tower needs no place in the key, since text features do
not depend on it (and a bundle whose prompts do records its image tower's fingerprint, which its sha256 pins).

A replica that activates a version loads its artefact instead of encoding every class prompt. One that is missing,
stale or damaged is refused here (`ArtefactRejected`, naming why) and the features are computed and stored again:
never trusted blindly, never a failure of the task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import safetensors.torch
import torch

from service.core.backbone import Backbone

FORMAT = "promptserve-features/1"
TENSOR = "text_features"


class ArtefactRejected(ValueError):
    """Stored bytes that are not the artefact this version and backbone need (the features are recomputed)."""


@dataclass(frozen=True)
class ArtefactKey:
    """What, besides the bundle's content, class text features depend on."""

    fingerprint: str  # the text tower's weights
    precision: str  # e.g. cpu-float32

    @classmethod
    def of(cls, backbone: Backbone) -> ArtefactKey:
        return cls(backbone.fingerprint, backbone.text_precision)

    @property
    def id(self) -> str:
        """The registry key: 32 hex digits."""
        return hashlib.sha256(json.dumps([FORMAT, self.fingerprint, self.precision]).encode()).hexdigest()[:32]


def encode_features(features: torch.Tensor, bundle_sha256: str, key: ArtefactKey) -> bytes:
    data = features.detach().to(torch.float32).cpu().contiguous()
    metadata = {"format": FORMAT, "bundle_sha256": bundle_sha256, "fingerprint": key.fingerprint,
                "precision": key.precision, "checksum": _checksum(data)}
    return safetensors.torch.save({TENSOR: data}, metadata=metadata)


def decode_features(data: bytes, bundle_sha256: str, key: ArtefactKey, shape: tuple[int, int]) -> torch.Tensor:
    """The features `data` holds if it is the artefact of this bundle content, key and shape [C, D]; else
    ArtefactRejected saying what differs. The header is checked before any tensor byte is materialized."""
    metadata, tensors = _header(data)
    expected = {"format": FORMAT, "bundle_sha256": bundle_sha256, "fingerprint": key.fingerprint,
                "precision": key.precision}
    for field, value in expected.items():
        if metadata.get(field) != value:
            raise ArtefactRejected(f"computed for another {field.replace('_', ' ')}")
    if tensors != {TENSOR: ("F32", list(shape))}:
        raise ArtefactRejected(f"holds {tensors}, not {TENSOR} of shape {list(shape)}")
    try:
        features = safetensors.torch.load(data)[TENSOR]
    except Exception as exc:  # noqa: BLE001
        raise ArtefactRejected(f"tensor data is malformed ({exc})") from None
    if metadata.get("checksum") != _checksum(features):
        raise ArtefactRejected("its checksum does not match its tensor bytes")
    if not torch.isfinite(features).all():
        raise ArtefactRejected("holds values that are not finite")
    return features


def _checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


MAX_HEADER_BYTES = 64 * 1024


def _header(data: bytes) -> tuple[dict[str, object], dict[str, object]]:
    """A safetensors file's metadata and its tensors' (dtype, shape), read from the header alone."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= min(MAX_HEADER_BYTES, len(data) - 8):
        raise ArtefactRejected("not a safetensors file (its header size is out of bounds)")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError as exc:
        raise ArtefactRejected(f"not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ArtefactRejected("not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    tensors = {name: (t.get("dtype"), t.get("shape")) if isinstance(t, dict) else t for name, t in header.items()}
    return metadata if isinstance(metadata, dict) else {}, tensors
