"""The torch-free half of the bundle contract: the header and what it declares."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from service.bundle.codec import decode_bundle, encode_bundle
from service.bundle.header import decode_header
from service.bundle.manifest import Manifest
from service.core.records import BackboneRef, PromptLayout
from service.methods import BundleError


def _with_header(data: bytes, edit) -> bytes:
    """`data` with its safetensors header JSON rewritten by `edit` (the tensor bytes kept)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def test_the_header_reports_the_payload_the_decoded_bundle_holds() -> None:
    manifest = Manifest("coop", BackboneRef("m", None, "f"), ("a", "b"), PromptLayout(4, 8))
    data = encode_bundle(manifest, {"ctx": torch.zeros(4, 8, dtype=torch.float16)})
    header = decode_header(data)
    assert header.manifest == decode_bundle(data).manifest
    assert header.payload_bytes == decode_bundle(data).payload_bytes == 4 * 8 * 2


def test_reversed_data_offsets_are_refused_by_tensor_name() -> None:
    manifest = Manifest("coop", BackboneRef("m", None, "f"), ("a", "b"), PromptLayout(4, 8))
    data = _with_header(encode_bundle(manifest, {"ctx": torch.zeros(4, 8)}),
                        lambda h: h["ctx"].update(data_offsets=[128, 0]))
    for read in (lambda d: decode_header(d).payload_bytes, decode_bundle):
        with pytest.raises(BundleError, match="bundle field 'ctx': tensor header entry is malformed"):
            read(data)
