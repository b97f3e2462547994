"""The Bonder is TGP-T's block exactly: its shapes, its 8d²+12d parameters, and its equations written out."""

from __future__ import annotations

import math

import pytest
import torch

from service.core.bonder import Bonder


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def literal_bonder(b: Bonder, queries: torch.Tensor, image: torch.Tensor, heads: int) -> torch.Tensor:
    """The reference's CrossAttnBlock, restated op by op (heads split by hand, K = V = LN(image tokens))."""
    batch, d = image.shape[0], image.shape[-1]
    q = queries.expand(batch, -1, -1)
    n, dh = q.shape[1], d // heads
    qkv = _layer_norm(q, b.norm1) @ b.self_attn.qkv.weight.T
    split = [t.reshape(batch, n, heads, dh).transpose(1, 2) for t in qkv.split(d, dim=-1)]
    attended = _softmax_attention(*split, scale=1 / math.sqrt(dh)).transpose(1, 2).reshape(batch, n, d)
    q = q + attended @ b.self_attn.proj.weight.T + b.self_attn.proj.bias
    kv = _layer_norm(image, b.norm2_kv)
    cross = _softmax_attention(_layer_norm(q, b.norm2_q) @ b.cross_attn.q.weight.T, kv, kv, scale=dh**-0.5)
    q = q + cross @ b.cross_attn.proj.weight.T + b.cross_attn.proj.bias
    hidden = torch.nn.functional.gelu(_layer_norm(q, b.norm_mlp) @ b.mlp[0].weight.T + b.mlp[0].bias)
    return q + hidden @ b.mlp[2].weight.T + b.mlp[2].bias


@pytest.mark.parametrize("width", [16, 128, 512])
def test_bonder_has_eight_d_squared_plus_twelve_d_parameters(width: int) -> None:
    assert sum(p.numel() for p in Bonder(width).parameters()) == 8 * width**2 + 12 * width


def test_bonder_maps_shared_queries_and_image_tokens_to_per_image_rows() -> None:
    out = Bonder(16, heads=8)(torch.randn(1, 5, 16), torch.randn(3, 7, 16))
    assert out.shape == (3, 5, 16)


def test_bonder_equals_a_literal_restatement_of_its_equations() -> None:
    torch.manual_seed(0)
    bonder = Bonder(32, heads=4)
    for p in bonder.parameters():  # move LayerNorms off their identity init so they are really tested
        torch.nn.init.normal_(p, std=0.2)
    queries, image = torch.randn(1, 6, 32), torch.randn(2, 9, 32) * 3
    torch.testing.assert_close(bonder(queries, image), literal_bonder(bonder, queries, image, heads=4),
                               atol=1e-5, rtol=1e-5)


def test_image_tokens_reach_the_output_only_through_cross_attention() -> None:
    bonder = Bonder(16, heads=8)
    queries = torch.randn(1, 4, 16)
    a, b = bonder(queries, torch.randn(1, 5, 16)), bonder(queries, torch.randn(1, 5, 16))
    assert not torch.allclose(a, b)
    with torch.no_grad():
        bonder.cross_attn.proj.weight.zero_()
        bonder.cross_attn.proj.bias.zero_()
    torch.testing.assert_close(bonder(queries, torch.randn(1, 5, 16)), bonder(queries, torch.randn(1, 5, 16)))


def test_width_not_divisible_by_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Bonder(30, heads=8)
