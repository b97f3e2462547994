"""Prompt-aware text encoding for open_clip text towers.

open_clip's `encode_text` maps token ids to embeddings itself. Prompt methods instead splice learned
context vectors into placeholder slots of "X X X X {class}." before the positional embedding; this module
does that, and then runs the tower exactly as open_clip does (causal transformer, final norm, the row at
the end-of-text token, projection). Sequences are cut just after the longest end-of-text token: under
the causal mask nothing after it can change the pooled row; for the same reason the leading tokens that
every prompt shares (start token + context, or a template's words) are computed once, not once per class.

Deep prompts (MaPLe): `deep` [J-1, n_ctx, d] replace the context rows' hidden states before blocks 1..J-1
(no positional embedding is added to them); from block J on the rows are carried forward. The context
rows sit inside the shared prefix, so prefix reuse stays exact: the replacement is done once, on the prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from service.core.open_clip_compat import (
    ClipModel,
    block_suffix_after_prefix,
    causal_mask,
    prefix_reuse_blocker,
    prompt_capable_text_tower,
    text_blocks,
    text_cast_dtype,
    text_projection,
)
from service.core.records import PromptLayout

log = logging.getLogger(__name__)

PLACEHOLDER_TEXT = "x"


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of class prompts; `ctx_mask` marks the slots that learned context fills."""

    ids: torch.Tensor  # [C, L] int64
    ctx_mask: torch.Tensor  # [C, L] bool
    eot: torch.Tensor  # [C] position of the end-of-text token


class PromptTextEncoder:
    def __init__(self, model: ClipModel, tokenizer: Any):
        tower = prompt_capable_text_tower(model)
        self.tower = tower
        self.tokenizer = tokenizer
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        (self.placeholder,) = tokenizer.encode(PLACEHOLDER_TEXT)
        self.context_length: int = tower.positional_embedding.shape[0]
        # Why the shared-prefix fast path cannot run on this tower (None: it can); tests assert it is None.
        self.prefix_reuse_blocker = prefix_reuse_blocker(tower)
        self.can_reuse_prefix = self.prefix_reuse_blocker is None
        if not self.can_reuse_prefix:
            log.warning("shared-prefix text encoding is off (%s): activation runs every prompt in full",
                        self.prefix_reuse_blocker)
        self.width: int = tower.token_embedding.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tower.positional_embedding.device

    # --- tokens --------------------------------------------------------------------------------------

    def phrase_embeddings(self, text: str, n_ctx: int | None = None) -> torch.Tensor:
        """Token embeddings [n, d] (float32, CPU) of `text`: how a learned context starts from a hand-written
        phrase ("a photo of a"). With `n_ctx`, the phrase must be exactly that many tokens."""
        ids = self.tokenizer.encode(text)
        if n_ctx is not None and len(ids) != n_ctx:
            raise ValueError(f"ctx_init {text!r} is {len(ids)} tokens but the prompt has n_ctx={n_ctx}: set n_ctx "
                             f"to {len(ids)} or pick another phrase")
        embedding = self.tower.token_embedding
        return embedding(torch.tensor(ids, device=embedding.weight.device)).detach().float().cpu()

    def class_prompt_tokens(self, classnames: list[str] | tuple[str, ...], layout: PromptLayout,
                            fixed_text: str = "") -> PromptTokens:
        """Token ids for "<ctx> {fixed_text} {class}." (or front/middle), with the context slots marked.

        `fixed_text` is frozen text right before the class name (MaPLe keeps "of a" of "a photo of a").
        """
        fixed_ids = self.tokenizer.encode(fixed_text) if fixed_text else []
        rows = [self._class_prompt_row(name, layout, fixed_ids) for name in classnames]
        return self._pad(rows)

    def template_tokens(self, texts: list[str]) -> PromptTokens:
        """Token ids for plain texts (no learned context), as open_clip's tokenizer would make them."""
        rows = []
        for text in texts:
            ids = [self.sot, *self.tokenizer.encode(text), self.eot]
            self._check_length(ids, text)
            rows.append((ids, [False] * len(ids)))
        return self._pad(rows)

    def _class_prompt_row(self, classname: str, layout: PromptLayout,
                          fixed_ids: list[int]) -> tuple[list[int], list[bool]]:
        name_ids = fixed_ids + self.tokenizer.encode(classname)
        period = self.tokenizer.encode(".")
        n_front = {"end": layout.n_ctx, "middle": layout.n_ctx // 2, "front": 0}[layout.class_token_position]
        n_back = layout.n_ctx - n_front
        pieces = [
            ([self.sot], False),
            ([self.placeholder] * n_front, True),
            (name_ids, False),
            ([self.placeholder] * n_back, True),
            (period + [self.eot], False),
        ]
        ids = [i for part, _ in pieces for i in part]
        mask = [is_ctx for part, is_ctx in pieces for _ in part]
        self._check_length(ids, classname)
        return ids, mask

    def _check_length(self, ids: list[int], text: str) -> None:
        if len(ids) > self.context_length:
            raise ValueError(
                f"prompt for {text!r} needs {len(ids)} tokens but the text tower's context length is "
                f"{self.context_length}; shorten the class name or use fewer context tokens"
            )

    def _pad(self, rows: list[tuple[list[int], list[bool]]]) -> PromptTokens:
        length = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (row_ids, row_mask) in enumerate(rows):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_mask)] = torch.tensor(row_mask)
        return PromptTokens(ids, mask, torch.tensor([len(r) - 1 for r, _ in rows]))

    # --- encoding ------------------------------------------------------------------------------------

    def encode_classes(
        self, classnames: list[str] | tuple[str, ...], ctx: torch.Tensor, layout: PromptLayout,
        deep: torch.Tensor | None = None, fixed_text: str = "",
    ) -> torch.Tensor:
        """Unnormalized class features with `ctx` ([n_ctx, d] shared, or [C, n_ctx, d]) spliced in,
        and optionally deep prompts `deep` [J-1, n_ctx, d] (see the module docstring).

        Differentiable in `ctx` and `deep`, so the trainer learns prompts through this same function.
        """
        tokens = self.class_prompt_tokens(classnames, layout, fixed_text)
        return self.encode_tokens(tokens, ctx, deep=deep)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unnormalized features of plain texts; equals open_clip's `encode_text`."""
        return self.encode_tokens(self.template_tokens(texts))

    def encode_tokens(self, tokens: PromptTokens, ctx: torch.Tensor | None = None,
                      reuse_prefix: bool = True, deep: torch.Tensor | None = None) -> torch.Tensor:
        ids = tokens.ids.to(self.device)
        x = self.tower.token_embedding(ids)
        if ctx is not None:
            n_classes, n_slots = ids.shape[0], int(tokens.ctx_mask[0].sum())
            rows = ctx.to(self.device, x.dtype).expand(n_classes, n_slots, self.width)
            x = x.masked_scatter(tokens.ctx_mask.to(self.device)[..., None], rows)
        deep_prompts = None
        if deep is not None:
            deep_prompts = DeepPrompts(shared_ctx_positions(tokens).to(self.device), deep.to(self.device))
        return self.encode_embeddings(x, tokens.eot.to(self.device), reuse_prefix, deep_prompts)

    def sentence_embeddings(self, groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of `[SOT, rows, ".", EOT]` for every row block [B_i, n_i, d] (differentiable in the rows),
        padded after the EOT, and the EOT positions: image-conditioned prompts (TGP-T) with no class name."""
        embed = self.tower.token_embedding
        sot, tail = embed(torch.tensor([self.sot], device=self.device)), embed(torch.tensor(
            [*self.tokenizer.encode("."), self.eot], device=self.device))
        length = max(g.shape[1] for g in groups) + 1 + len(tail)
        if length > self.context_length:
            raise ValueError(f"{length - 1 - len(tail)} prompt rows + {1 + len(tail)} fixed tokens exceed the text "
                             f"tower's context length {self.context_length}; use fewer queries")
        sentences, eot = [], []
        for rows in groups:
            batch, n = rows.shape[:2]
            x = torch.cat([sot.expand(batch, 1, -1), rows.to(sot.dtype), tail.expand(batch, -1, -1)], dim=1)
            sentences.append(F.pad(x, (0, 0, 0, length - x.shape[1])))
            eot.append(torch.full((batch,), n + len(tail), device=self.device))
        return torch.cat(sentences), torch.cat(eot)

    def encode_embeddings(self, x: torch.Tensor, eot: torch.Tensor, reuse_prefix: bool = True,
                          deep: DeepPrompts | None = None) -> torch.Tensor:
        """Run the tower on token embeddings [C, L, d]; pool the row at each `eot` position."""
        tower = self.tower
        length = int(eot.max()) + 1
        x = x[:, :length].to(text_cast_dtype(tower))
        x = x + tower.positional_embedding[:length].to(x.dtype)
        mask = causal_mask(tower, length)
        prefix = shared_prefix_length(x, limit=int(eot.min())) if reuse_prefix and self.can_reuse_prefix else 0
        if deep is not None and prefix <= int(deep.positions.max()):
            prefix = 0  # the replaced rows must lie inside the shared prefix to be replaced once
        if prefix >= 2 and x.shape[0] > 1:
            x, eot = self._run_with_shared_prefix(x, mask, prefix, deep), eot - prefix
        elif deep is not None:
            x = self._run_blocks(x, mask, deep)
        else:
            x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        return text_projection(tower, x[torch.arange(x.shape[0], device=x.device), eot])

    def _run_blocks(self, x: torch.Tensor, mask: torch.Tensor, deep: DeepPrompts) -> torch.Tensor:
        """The tower's blocks one by one, with the deep prompts put in before blocks 1..J-1."""
        for i, block in enumerate(text_blocks(self.tower)):
            x = block(deep.apply(x, i), attn_mask=mask)
        return x

    def _run_with_shared_prefix(self, x: torch.Tensor, mask: torch.Tensor, prefix: int,
                                deep: DeepPrompts | None = None) -> torch.Tensor:
        """The causal mask makes the first `prefix` rows identical for every sequence at every layer, so
        run them once (batch 1), keep their keys and values, and run only each sequence's suffix."""
        shared, suffix = x[:1, :prefix], x[:, prefix:].contiguous()
        for i, block in enumerate(text_blocks(self.tower)):
            shared = deep.apply(shared, i) if deep is not None else shared
            suffix = block_suffix_after_prefix(block, shared, suffix, mask[prefix:])
            shared = block(shared, attn_mask=mask[:prefix, :prefix])
        return suffix


@dataclass(frozen=True)
class DeepPrompts:
    """Deep text prompts `rows` [J-1, n, d] for the sequence positions `positions` [n]."""

    positions: torch.Tensor
    rows: torch.Tensor

    def apply(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """`x` [B, L, d] with the prompt rows replaced if `block` is one of 1..J-1 (differentiably)."""
        if not 1 <= block <= self.rows.shape[0]:
            return x
        x = x.clone()
        x[:, self.positions] = self.rows[block - 1].to(x.dtype).expand(x.shape[0], -1, -1)
        return x


def shared_ctx_positions(tokens: PromptTokens) -> torch.Tensor:
    """The context slots' positions, which deep prompts need to be the same in every class prompt."""
    first = tokens.ctx_mask[0]
    if not (tokens.ctx_mask == first).all() or not first.any():
        raise ValueError("deep prompts need the context at the same positions in every prompt (position 'end')")
    return first.nonzero().reshape(-1)


def shared_prefix_length(x: torch.Tensor, limit: int) -> int:
    """How many leading positions hold the same embedding in every row (at most `limit`)."""
    same = (x[:, :limit] == x[:1, :limit]).all(dim=2).all(dim=0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else limit
