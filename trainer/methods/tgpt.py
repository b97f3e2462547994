"""TGP-T (Tan et al., 2024; EricTan7/TGP-T): image-conditioned prompts under compound text supervision.

Two Bonders turn static queries and an image's tokens into a category prompt and a content prompt,
each run as `[SOT, rows, ".", EOT]` through the frozen text tower; a linear head classifies
normalize(cat[image feature, mean text feature]) × 100. No class name ever enters the text tower, so a
step costs two text passes per image whatever the class count. Besides the classification loss, a
frozen vocabulary head (the token embedding matrix, tied) reads every prompt row as a token: the
category prompt must spell "a photo of a {class}." and the content prompt the image's description
(token cross-entropy, label smoothing 0.1, over the 49k-token vocabulary in chunks so memory stays bounded).

Logits come from the service's own functions (`service.core.bonder`), so the trainer and the service agree by
construction; the image tower is frozen, so training runs from cached tokens + pooled features.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from service.bundle.manifest import Manifest, build_manifest
from service.core.backbone import Backbone
from service.core.bonder import TGPTDims, TGPTModel, group_logits, logits_from_prompts
from service.core.text_encoder import PromptTextEncoder
from service.methods.tgpt import CATEGORY_TEMPLATE, TGPTConfig
from trainer.data import Sample
from trainer.features import CLEAN, FreshSet, Views, encode_views, fresh_set
from trainer.methods.base import EXPORT_DTYPES, TRAINER_VERSION, config_json

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TokenBatch:
    tokens: torch.Tensor  # [B, T, width] projected image tokens before ln_post
    pooled: torch.Tensor  # [B, D] unnormalized image features
    content_targets: torch.Tensor  # [B, content_queries] description token ids, IGNORE-padded


@dataclass(frozen=True)
class TokenSet:
    """Cached image outputs per image and view ([N, K, ...]), labels [N] and description targets [N, nq]."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    labels: torch.Tensor
    content_targets: torch.Tensor

    @property
    def views(self) -> int:
        return self.tokens.shape[1]

    def batch(self, idx: torch.Tensor, view: torch.Tensor) -> tuple[TokenBatch, torch.Tensor]:
        return TokenBatch(self.tokens[idx, view], self.pooled[idx, view], self.content_targets[idx]), self.labels[idx]


def token_targets(encoder: PromptTextEncoder, texts: list[str | None], length: int) -> torch.Tensor:
    """Token ids after SOT (EOT included) of each text, cut to `length`, IGNORE-padded; None → all IGNORE."""
    out = torch.full((len(texts), length), IGNORE, dtype=torch.long)
    for i, text in enumerate(texts):
        if text is not None:
            ids = [*encoder.tokenizer.encode(text), encoder.eot][:length]
            out[i, : len(ids)] = torch.tensor(ids)
    return out


def _chunk_logsumexp(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(rows @ weight.T, dim=-1)


def vocab_loss(rows: torch.Tensor, targets: torch.Tensor, vocab: torch.Tensor, smoothing: float,
               chunk: int) -> torch.Tensor:
    """Label-smoothed cross-entropy of `rows @ vocab.T` against `targets` (IGNORE skipped), equal to
    `F.cross_entropy(..., label_smoothing=smoothing)`, without ever holding more than [N, chunk] logits
    (each chunk's log-sum-exp is recomputed in backward)."""
    keep = targets != IGNORE
    if not keep.any():
        return rows.sum() * 0.0
    x, y = rows[keep].float(), targets[keep]
    parts = [checkpoint(_chunk_logsumexp, x, w, use_reentrant=False) for w in vocab.split(chunk)]
    lse = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
    target_logit = (x * vocab[y]).sum(-1)
    mean_logit = x @ vocab.mean(dim=0)
    return ((1 - smoothing) * (lse - target_logit) + smoothing * (lse - mean_logit)).mean()


class TGPT(nn.Module):
    method: ClassVar[str] = "tgpt"
    category_targets: torch.Tensor  # a registered buffer, declared so it types as a tensor, not `Tensor | Module`

    def __init__(self, config: TGPTConfig, backbone: Backbone, classnames: tuple[str, ...]):
        super().__init__()
        sizes, text = backbone.sizes, backbone.text
        if sizes.token_prompts is not None:
            raise ValueError(f"tgpt cannot run on this backbone: {sizes.token_prompts}")
        if sizes.embed_dim != text.width:
            raise ValueError(f"tgpt feeds projected image tokens ({sizes.embed_dim} wide) to Bonders as wide as the "
                             f"text tower ({text.width}); this backbone's widths differ")
        config.check_context(text.context_length)
        self.config, self.classnames = config, tuple(classnames)
        self._backbone = [backbone]  # not a submodule: never saved, moved or trained
        dims = TGPTDims(config.category_queries, config.content_queries, text.width, sizes.embed_dim, config.heads)
        self.model = TGPTModel(dims, len(self.classnames))
        self._init_queries()
        self._init_head()
        targets = token_targets(text, [CATEGORY_TEMPLATE.format(c) for c in self.classnames], dims.category_queries)
        self.register_buffer("category_targets", targets)
        if (targets[:, -1] != IGNORE).any():
            log.warning("%d category queries cut some 'a photo of a {class}.' targets short", dims.category_queries)

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    @property
    def vocab(self) -> torch.Tensor:
        """The frozen vocabulary head: the text tower's token embedding matrix itself (tied)."""
        return self.backbone.text.tower.token_embedding.weight

    @torch.no_grad()
    def _init_queries(self) -> None:
        for queries in (self.model.category_queries, self.model.content_queries):
            queries.normal_(0.0, self.config.init_std)
        if self.config.ctx_init:
            phrase = self.backbone.text.phrase_embeddings(self.config.ctx_init)[: self.config.category_queries]
            self.model.category_queries[: len(phrase)] = phrase

    @torch.no_grad()
    def _init_head(self) -> None:
        """Zero-shot weights: normalize(cat[t̄_c, t̄_c]), t̄_c the mean template feature of class c."""
        text = self.backbone.text
        features = torch.stack([text.encode_texts([t.format(c) for c in self.classnames]).float().cpu()
                                for t in self.config.templates]).mean(dim=0)
        self.model.head.weight.copy_(F.normalize(torch.cat([features, features], dim=-1), dim=-1))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def after_step(self) -> None:
        """Nothing to do after an optimizer step (the engine's hook)."""

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] from image tokens [B, T, width] and pooled features [B, D]."""
        return group_logits(self.backbone.text, [self.model], [tokens], [pooled])[0]

    def loss(self, batch: TokenBatch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CE(logits) + token loss of the category prompt + token loss of the content prompt."""
        device = self.vocab.device
        category, content = self.model.prompts(batch.tokens.to(device))
        (logits,) = logits_from_prompts(self.backbone.text, [self.model], [batch.pooled.to(device)],
                                        [(category, content)])
        labels = labels.to(device)
        cfg = self.config
        category_loss = vocab_loss(category, self.category_targets[labels], self.vocab, cfg.label_smoothing,
                                   cfg.vocab_chunk)
        content_loss = vocab_loss(content, batch.content_targets.to(device), self.vocab, cfg.label_smoothing,
                                  cfg.vocab_chunk)
        return F.cross_entropy(logits, labels) + category_loss + content_loss, logits

    def training_set(self, samples: list[Sample], descriptions: list[str | None], views: Views = CLEAN,
                     progress: bool = False) -> TokenSet | FreshSet:
        """Every image's tokens and pooled feature per view, cached, and its targets; at 0 views, tokens
        encoded afresh from a new augmentation every step (the reference's recipe: caching many views of
        [197, 512] tokens per image would not fit in memory at ViT-B/16 scale)."""
        targets = token_targets(self.backbone.text, descriptions, self.config.content_queries)
        if views.count == 0:
            def fresh(pixels: torch.Tensor, idx: torch.Tensor) -> TokenBatch:
                out = self.backbone.encode_image_tokens(pixels)
                return TokenBatch(out.tokens, out.pooled, targets[idx])

            return fresh_set(self.backbone, samples, views, fresh)

        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.backbone.encode_image_tokens(pixels)
            return out.tokens.cpu(), out.pooled.cpu()

        tokens, pooled = encode_views(encode, self.backbone, samples, views, progress=progress, desc="image tokens")
        return TokenSet(tokens, pooled, torch.tensor([s.label for s in samples]), targets)

    def export(self, metrics: dict[str, Any] | None = None) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """The bundle (manifest, tensors) the service decodes: queries, both Bonders and the head."""
        dtype = EXPORT_DTYPES[self.config.export_dtype]
        options = {**asdict(self.model.dims), "trainer": config_json(self.config),
                   "trainable_parameters": self.trainable_parameters()}
        manifest = build_manifest(self.method, self.backbone, self.classnames, options=options, metrics=metrics,
                                  trainer_version=TRAINER_VERSION)
        return manifest, {name: t.detach().to(dtype).cpu() for name, t in self.model.state_dict().items()}
