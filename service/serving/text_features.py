"""Class text features: every class name through the prompt-aware text encoder, once per task version.

A learned prompt (`Bundle.class_prompt`) is spliced around each name; without one, each name goes through the
method's templates and the features are averaged (zero-shot). Trainer, evaluator and service all call this.
Plain texts (`POST /v1/embeddings`) go through the same encoder, one normalized feature each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.bundle.codec import Bundle
from service.core.backbone import Backbone
from service.core.records import PromptLayout
from service.methods import BundleError, ClassPrompt
from service.methods.common import fill_template

TEXT_BATCH = 256


@torch.no_grad()
def text_features(bundle: Bundle, backbone: Backbone) -> torch.Tensor:
    """L2-normalized class text features [C, D] (float32, CPU)."""
    names = list(bundle.classnames)
    prompt = bundle.class_prompt(backbone.text)
    if prompt is not None:
        features = _encode_classes(backbone, names, prompt, bundle.prompt)
    else:
        templates = bundle.spec.templates(bundle)
        if not templates:
            raise BundleError("method", f"a {bundle.manifest.method} bundle encodes no class text")
        # every (template, name) text in one call, template-major: chunks share a template's prefix
        texts = [fill_template(t, n) for t in templates for n in names]
        features = text_embeddings(backbone, texts).view(len(templates), len(names), -1).mean(dim=0)
    return F.normalize(features.float(), dim=-1).cpu()


def _encode_classes(backbone: Backbone, names: list[str], prompt: ClassPrompt, layout: PromptLayout) -> torch.Tensor:
    chunks = []
    for start in range(0, len(names), TEXT_BATCH):
        ctx = prompt.ctx[start : start + TEXT_BATCH] if layout.class_specific else prompt.ctx
        chunks.append(backbone.text.encode_classes(names[start : start + TEXT_BATCH], ctx, layout, prompt.deep,
                                                   prompt.fixed_text).float())
    return torch.cat(chunks)


@torch.no_grad()
def text_embeddings(backbone: Backbone, texts: list[str]) -> torch.Tensor:
    """Each text's L2-normalized features [N, D] (templates are averaged after normalizing, as CLIP's zero-shot
    does); a ValueError names a text longer than the text context."""
    return torch.cat([F.normalize(backbone.text.encode_texts(texts[start : start + TEXT_BATCH]).float(), dim=-1)
                      for start in range(0, len(texts), TEXT_BATCH)])


def token_counts(backbone: Backbone, texts: list[str]) -> list[int]:
    """Tokens each text takes in the text context, start and end tokens included."""
    return [len(backbone.text.tokenizer.encode(text)) + 2 for text in texts]
