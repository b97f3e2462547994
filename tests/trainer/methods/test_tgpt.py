"""The TGP-T learner: its targets, its chunked token loss, cached-token training, and its exported bundle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.bundle.codec import decode_bundle, encode_bundle
from service.core.open_clip_compat import prompt_capable_vit, vit_pooled_and_tokens
from service.serving.heads import ImageRows, build_head
from trainer.configs import TrainConfig
from trainer.data import Sample, open_image
from trainer.engine import train_learner
from trainer.methods import build_learner, make_config
from trainer.methods.tgpt import IGNORE, TokenBatch, vocab_loss
from trainer.world.dataset import write_imagefolder

CLASSES = ("circle", "square", "star")


def learner(backbone, **options):
    options = {"category_queries": 8, "content_queries": 12, "export_dtype": "float32"} | options
    return build_learner("tgpt", make_config("tgpt", **options), backbone, CLASSES)


@pytest.fixture(scope="module")
def world(tiny_backbone, tmp_path_factory):
    """Two photo images per class of the shape family, with the renderer's captions as descriptions."""
    root = tmp_path_factory.mktemp("world")
    write_imagefolder(root, "shape", 2, seed=3, size=48, descriptions=True)
    samples = [Sample(p, CLASSES.index(p.parent.name), p.parent.name)
               for name in CLASSES for p in sorted((root / name).glob("*.png"))]
    captions = dict(line.split("\t")[:2] for line in (root / "descriptions.tsv").read_text().splitlines())
    return samples, [captions[f"{s.classname}/{s.path.name}"] for s in samples]


def test_category_targets_are_the_tokens_of_a_photo_of_a_class_with_eot(tiny_backbone) -> None:
    tgpt = learner(tiny_backbone)
    ids = tiny_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])[:, 1:1 + 8]  # drop SOT, keep EOT
    assert torch.equal(tgpt.category_targets, ids.masked_fill(ids == 0, IGNORE))
    assert (tgpt.category_targets == tiny_backbone.tokenizer.eot_token_id).sum(dim=1).tolist() == [1, 1, 1]


def test_query_counts_that_overflow_the_text_context_are_refused_with_the_limit(tiny_backbone) -> None:
    with pytest.raises(ValueError, match="content_queries = 30.*context length is 32.*at most 29"):
        learner(tiny_backbone, content_queries=30)


def test_a_backbone_whose_image_and_text_widths_differ_is_refused(backbone) -> None:
    with pytest.raises(ValueError, match="widths differ"):
        learner(backbone)


def test_chunked_vocabulary_loss_equals_label_smoothed_cross_entropy_and_its_gradient() -> None:
    torch.manual_seed(0)
    vocab = torch.randn(1000, 16)
    rows = torch.randn(3, 5, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (3, 5))
    targets[0, 3:] = IGNORE
    chunked = vocab_loss(rows, targets, vocab, smoothing=0.1, chunk=128)
    (grad_chunked,) = torch.autograd.grad(chunked, rows)
    full = F.cross_entropy((rows @ vocab.T).reshape(-1, 1000), targets.reshape(-1), ignore_index=IGNORE,
                           label_smoothing=0.1)
    (grad_full,) = torch.autograd.grad(full, rows)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)
    assert vocab_loss(rows, torch.full((3, 5), IGNORE), vocab, 0.1, 128).item() == 0.0


def test_training_from_cached_tokens_gives_the_loss_and_gradients_of_training_from_pixels(tiny_backbone,
                                                                                          world) -> None:
    samples, captions = world
    tgpt = learner(tiny_backbone)
    cached = tgpt.training_set(samples, captions)
    idx = torch.arange(len(samples))
    batch, labels = cached.batch(idx, torch.zeros_like(idx))
    pixels = torch.stack([tiny_backbone.preprocess(open_image(s.path)) for s in samples])
    pooled, tokens = vit_pooled_and_tokens(prompt_capable_vit(tiny_backbone.model.visual), pixels)

    def loss_and_grads(b: TokenBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tgpt.zero_grad()
        loss, _ = tgpt.loss(b, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tgpt.parameters() if p.requires_grad]

    loss_cached, grads_cached = loss_and_grads(batch)
    loss_pixels, grads_pixels = loss_and_grads(TokenBatch(tokens, pooled, batch.content_targets))
    torch.testing.assert_close(loss_cached, loss_pixels)
    for a, b in zip(grads_cached, grads_pixels, strict=True):
        torch.testing.assert_close(a, b)
    assert (batch.content_targets != IGNORE).any(dim=1).all()  # every image has its caption as target


def test_learner_logits_equal_the_service_logits_of_its_exported_bundle(tiny_backbone, world) -> None:
    samples, captions = world
    tgpt = learner(tiny_backbone)
    data = tgpt.training_set(samples, captions)
    train_learner(tgpt, data, TrainConfig(epochs=1, batch_size=6, optimizer="adamw", lr=1e-3, warmup_epochs=0))
    tokens, pooled = data.tokens[:, 0], data.pooled[:, 0]
    with torch.no_grad():
        learned = tgpt(tokens, pooled)
    head = build_head(decode_bundle(encode_bundle(*tgpt.export())), tiny_backbone)  # the service's head
    (served,) = type(head).score([(head, ImageRows(F.normalize(pooled, dim=-1), pooled, tokens))], tiny_backbone)
    torch.testing.assert_close(served, learned, atol=1e-5, rtol=1e-5)


def test_head_starts_as_the_zero_shot_classifier(tiny_backbone) -> None:
    tgpt = learner(tiny_backbone)
    text = F.normalize(tiny_backbone.text.encode_texts([f"a photo of a {c}." for c in CLASSES]), dim=-1)
    head = tgpt.model.head.weight
    torch.testing.assert_close(F.normalize(head[:, :128], dim=-1), text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head[:, :128], head[:, 128:])
    query_init = tiny_backbone.text.tower.token_embedding.weight[tiny_backbone.tokenizer.encode("a photo of a")]
    torch.testing.assert_close(tgpt.model.category_queries[:4], query_init)
