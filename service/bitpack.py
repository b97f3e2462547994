"""Bit-packing of b-bit quantization indices (b = 1..8) into a dense little-endian byte stream."""

from __future__ import annotations

import math

import numpy as np
import torch


def packed_size(bits: int, count: int) -> int:
    """Bytes needed to store `count` indices of `bits` bits each."""
    return math.ceil(bits * count / 8)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2**bits) into a uint8 tensor of `packed_size(bits, n)` bytes."""
    _check_bits(bits)
    flat = indices.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) for {bits}-bit packing")
    bit_planes = (flat[:, None] >> np.arange(bits)) & 1
    packed = np.packbits(bit_planes.astype(np.uint8).reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_indices`: the first `count` indices as an int64 tensor."""
    _check_bits(bits)
    if packed.numel() != packed_size(bits, count):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {count} {bits}-bit indices")
    bit_stream = np.unpackbits(packed.cpu().numpy().astype(np.uint8), bitorder="little")
    bit_planes = bit_stream[: bits * count].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((bit_planes << np.arange(bits)).sum(axis=1))


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
