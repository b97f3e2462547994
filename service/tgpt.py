"""Serving TGP-T: image-conditioned prompts, from one shared image forward to per-task class logits.

Per micro-batch the image tower runs once (`encode_image_tokens`): its pooled feature serves every
text-side task and, with the projected tokens, every TGP-T task. Then all TGP-T rows of all tasks share
the text tower: their category prompts go through it in ONE call and their content prompts in ONE more
(`tgpt_logits`), whatever the number of tasks or classes. Nothing per class is encoded at activation:
a task is its `TGPTModel` (queries, Bonders, head) built from the bundle (`model_from_bundle`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.backbone import Backbone
from service.bonder import TGPTModel
from service.bundle import Bundle, BundleError, Manifest, tgpt_dims
from service.manifest import FIXED_TOKENS
from service.open_clip_compat import prompt_capable_vit, vit_pooled_and_tokens
from service.text_encoder import PromptTextEncoder


@dataclass(frozen=True)
class ImageTokens:
    """One image forward's outputs: normalized features for text-side tasks, raw pooled features and tokens
    for TGP-T tasks (on the backbone's device)."""

    features: torch.Tensor  # [B, D] L2-normalized, float32, CPU (what `Backbone.encode_images` gives)
    pooled: torch.Tensor  # [B, D] unnormalized
    tokens: torch.Tensor  # [B, T, width]


@dataclass(frozen=True)
class TGPTRow:
    """One image for one TGP-T task: the task's model and that image's tokens [T, width] and pooled feature [D]."""

    model: TGPTModel
    tokens: torch.Tensor
    pooled: torch.Tensor


@torch.no_grad()  # not inference_mode: the trainer caches these tensors and trains on them
def encode_image_tokens(backbone: Backbone, pixels: torch.Tensor) -> ImageTokens:
    """The shared image forward of a micro-batch that holds TGP-T rows (fp32 torch tower)."""
    visual = prompt_capable_vit(backbone.model.visual)
    pooled, tokens = vit_pooled_and_tokens(visual, pixels.to(backbone.device, torch.float32))
    return ImageTokens(F.normalize(pooled.float(), dim=-1).cpu(), pooled, tokens)


def model_from_bundle(bundle: Bundle) -> TGPTModel:
    """The task's float32 model in eval mode; the bundle was validated by `decode_bundle`."""
    model = TGPTModel(tgpt_dims(bundle.manifest.options), len(bundle.manifest.classnames))
    model.load_state_dict({name: t.float() for name, t in bundle.tensors.items()})
    return model.eval().requires_grad_(False)


def check_tgpt_backbone(manifest: Manifest, backbone: Backbone) -> None:
    """Refuse a TGP-T bundle whose sizes do not fit this backbone's towers."""
    dims, text = tgpt_dims(manifest.options), backbone.text
    try:
        visual = prompt_capable_vit(backbone.model.visual)
    except ValueError as exc:
        raise BundleError("method", f"tgpt cannot run on this backbone: {exc}") from exc
    if dims.width != text.width:
        raise BundleError("options.width", f"is {dims.width}, this backbone's text width is {text.width}")
    if dims.embed_dim != visual.output_dim:
        raise BundleError("options.embed_dim", f"is {dims.embed_dim}, this backbone's is {visual.output_dim}")
    longest = max(dims.category_queries, dims.content_queries)
    if longest + FIXED_TOKENS > text.context_length:
        raise BundleError("options", f"{longest} queries + {FIXED_TOKENS} fixed tokens exceed the text context "
                                     f"length {text.context_length}")


def encode_prompt_rows(encoder: PromptTextEncoder, groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Text features of `[SOT, rows, ".", EOT]` for every row block [B_i, n_i, width], in ONE text-tower call."""
    x, eot = encoder.sentence_embeddings(list(groups))
    features = encoder.encode_embeddings(x, eot, reuse_prefix=False)  # only SOT is shared: nothing to reuse
    return list(features.float().split([g.shape[0] for g in groups]))


def logits_from_prompts(
    encoder: PromptTextEncoder, models: Sequence[TGPTModel], pooled: Sequence[torch.Tensor],
    prompts: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[torch.Tensor]:
    """Per model, logits [B_i, C_i] from its rows' pooled features and Bonder outputs: two text calls in all."""
    category = encode_prompt_rows(encoder, [p[0] for p in prompts])
    content = encode_prompt_rows(encoder, [p[1] for p in prompts])
    return [m.classify(p, c, o) for m, p, c, o in zip(models, pooled, category, content, strict=True)]


def group_logits(
    encoder: PromptTextEncoder, models: Sequence[TGPTModel], tokens: Sequence[torch.Tensor],
    pooled: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Logits of several tasks, each with its own image block (tokens [B_i, T, width], pooled [B_i, D])."""
    prompts = [m.prompts(t) for m, t in zip(models, tokens, strict=True)]
    return logits_from_prompts(encoder, models, pooled, prompts)


@torch.inference_mode()
def tgpt_logits(encoder: PromptTextEncoder, rows: Sequence[TGPTRow]) -> list[torch.Tensor]:
    """Class logits [C_task] for every row (rows of any number of TGP-T tasks, in any order)."""
    by_model: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_model.setdefault(id(row.model), []).append(i)
    members = list(by_model.values())
    logits = group_logits(
        encoder,
        [rows[idx[0]].model for idx in members],
        [torch.stack([rows[i].tokens for i in idx]) for idx in members],
        [torch.stack([rows[i].pooled for i in idx]) for idx in members],
    )
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for idx, block in zip(members, logits, strict=True):
        for i, row_logits in zip(idx, block, strict=True):
            out[i] = row_logits
    return out
