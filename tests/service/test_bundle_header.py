"""The torch-free half of the bundle contract: one method table split in two halves that must agree."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from service.bundle import METHODS, BackboneRef, Manifest, PromptLayout, decode_bundle, encode_bundle
from service.bundle_header import METHOD_INFO, BundleError, MethodInfo, decode_header
from service.manifest import NoOptions


def test_the_manifest_table_and_the_tensor_table_name_the_same_methods() -> None:
    assert set(METHOD_INFO) == set(METHODS)
    assert all(METHODS[name].info is info for name, info in METHOD_INFO.items())


def test_a_method_said_to_be_vision_side_must_have_vision_prompts() -> None:
    with pytest.raises(TypeError, match="vision prompts exactly when"):
        dataclasses.replace(METHODS["coop"], info=MethodInfo(True, NoOptions, vision_side=True))
    with pytest.raises(TypeError, match="vision prompts exactly when"):
        dataclasses.replace(METHODS["maple"], info=METHOD_INFO["coop"])


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
