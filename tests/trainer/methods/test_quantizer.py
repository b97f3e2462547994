"""QPrompt's quantizer: 2^b levels, straight-through gradients, constrained re-clustering, packed size."""

from __future__ import annotations

import math

import pytest
import torch

from service.core.bitpack import packed_size, unpack_indices
from service.methods.common import QuantizerConfig
from trainer.methods import build_learner, make_config
from trainer.methods.quantizer import KMeansQuantizer, histogram, kl_divergence


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dequantized_values_take_at_most_two_to_the_bits_values(bits: int) -> None:
    weight = torch.randn(4, 512, generator=torch.Generator().manual_seed(bits))
    quantizer = KMeansQuantizer(QuantizerConfig(bits=bits), weight)
    values = quantizer(weight).detach()
    assert 1 < values.unique().numel() <= 2**bits
    assert (values - weight).abs().mean() < (weight - weight.mean()).abs().mean()  # closer than a constant


def test_gradient_passes_straight_through() -> None:
    weight = torch.randn(4, 16, requires_grad=True)
    quantizer = KMeansQuantizer(QuantizerConfig(bits=1), weight)
    upstream = torch.randn(4, 16)
    (quantizer(weight) * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)


def _drift(weight: torch.Tensor) -> None:
    with torch.no_grad():  # skew the distribution (μ/σ normalization hides shifts and scales)
        weight.copy_((weight / weight.std()).exp())


def test_reclusters_only_after_min_steps_and_only_when_kl_exceeds_threshold() -> None:
    weight = torch.linspace(-2, 2, 64).reshape(4, 16).clone()
    quantizer = KMeansQuantizer(QuantizerConfig(bits=2, min_steps=5, kl_threshold=0.02), weight)
    assert quantizer.config.effective_kl_threshold == pytest.approx(0.06)  # 0.02 × (2² − 1)
    assert [quantizer.step(weight) for _ in range(10)] == [False] * 10  # steps enough, histogram unchanged
    assert quantizer.clusterings == 0
    _drift(weight)
    assert kl_divergence(histogram(quantizer.indices(weight), 4), quantizer.last_histogram) > 0.06
    quantizer.steps_since_clustering = 0
    fired = [quantizer.step(weight) for _ in range(5)]
    assert fired == [False, False, False, False, True]  # drifted, but waits for t = 5 steps
    assert quantizer.clusterings == 1 and quantizer.steps_since_clustering == 0
    assert [quantizer.step(weight) for _ in range(6)] == [False] * 6  # fresh histogram: no drift


def test_qprompt_training_counts_reclusterings(backbone) -> None:
    learner = build_learner("qprompt", make_config("qprompt", bits=1, min_steps=2, kl_threshold=0.0),
                            backbone, ("red", "green"))
    quantizer = learner.quantizer
    for step in range(6):
        with torch.no_grad():  # alternate skewed and symmetric prompts: the histogram moves every step
            learner.ctx.normal_()
        if step % 2:
            _drift(learner.ctx)
        learner.after_step()
    assert quantizer.clusterings == 3  # every 2nd step, since KL > 0 each time
    assert learner.export_options()["reclusterings"] == 3


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_export_packs_indices_into_ceil_bits_n_over_8_bytes_plus_codebook(backbone, bits: int) -> None:
    learner = build_learner("qprompt", make_config("qprompt", bits=bits, ctx_init=None), backbone, ("red", "blue"))
    tensors = learner.export_tensors()
    n = learner.ctx.numel()
    assert tensors["indices"].dtype == torch.uint8 and tensors["indices"].numel() == math.ceil(bits * n / 8)
    assert tensors["indices"].numel() == packed_size(bits, n)
    assert tensors["codebook"].dtype == torch.float16 and tensors["codebook"].numel() == 2**bits
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload == math.ceil(bits * n / 8) + 2 * 2**bits + 8  # + μ, σ as float32
    dequantized = tensors["sigma"] * tensors["codebook"].float()[unpack_indices(tensors["indices"], bits, n)]
    assert torch.equal((dequantized + tensors["mu"]).reshape(learner.ctx.shape), learner.context().detach())


def test_qcoop_paper_size_at_4x512_one_bit() -> None:
    assert packed_size(1, 4 * 512) + 2 * 2**1 == 260  # 0.26 KB, DESIGN.md §2


@pytest.mark.parametrize(("bits", "expected"), [(1, 0.007), (2, 0.021), (4, 0.105)])
def test_kl_threshold_scales_with_the_degrees_of_freedom(bits: int, expected: float) -> None:
    assert QuantizerConfig(bits=bits, kl_threshold=0.007).effective_kl_threshold == pytest.approx(expected)
