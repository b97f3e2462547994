"""Bit-packing of b-bit quantization indices (b = 1..8) into a dense little-endian byte stream, and the
dequantization of packed prompts (W = σ·codebook[index] + μ per group).

torch loads only when indices are packed or unpacked: `packed_size` is part of the methods' tensor rules,
which must import without torch (`promptserve-train --help`, `inspect`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def packed_size(bits: int, count: int) -> int:
    """Bytes needed to store `count` indices of `bits` bits each."""
    return math.ceil(bits * count / 8)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in [0, 2**bits) into a uint8 tensor of `packed_size(bits, n)` bytes."""
    import torch

    _check_bits(bits)
    flat = indices.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"indices must lie in [0, {2**bits}) for {bits}-bit packing")
    bit_planes = (flat[:, None] >> np.arange(bits)) & 1
    packed = np.packbits(bit_planes.astype(np.uint8).reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_indices`: the first `count` indices as an int64 tensor."""
    import torch

    _check_bits(bits)
    if packed.numel() != packed_size(bits, count):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold exactly {count} {bits}-bit indices")
    bit_stream = np.unpackbits(packed.cpu().numpy().astype(np.uint8), bitorder="little")
    bit_planes = bit_stream[: bits * count].reshape(count, bits).astype(np.int64)
    return torch.from_numpy((bit_planes << np.arange(bits)).sum(axis=1))


def dequantize(packed: torch.Tensor, codebook: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, bits: int,
               shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values of `shape` from packed indices and one codebook [G, 2^b] (or [2^b]) and (μ, σ) [G] per
    group; the leading rows of `shape` split evenly into the G groups."""
    codebook = codebook.float().reshape(-1, codebook.shape[-1])
    indices = unpack_indices(packed, bits, math.prod(shape)).reshape(codebook.shape[0], -1)
    values = codebook.gather(1, indices)
    return (sigma.float()[:, None] * values + mu.float()[:, None]).reshape(shape)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
