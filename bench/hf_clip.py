"""A random-weight Hugging Face CLIP with the architecture of an open_clip model config, saved to a local folder
with a tokenizer and image processor built offline — the peers' model, since no weights can be downloaded."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip
from open_clip.tokenizer import bytes_to_unicode, default_bpe

# open_clip's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of its BPE file (the line after its header on)
N_MERGES = 49152 - 256 - 2
HF_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # open_clip's <start_of_text>/<end_of_text>, same ids


def bpe_merges(bpe_path: str = default_bpe()) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:N_MERGES + 1]]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """The id of every token, in SimpleTokenizer's order: bytes, bytes ending a word, merges, special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(HF_SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer_files(folder: Path, bpe_path: str = default_bpe()) -> None:
    """`vocab.json` and `merges.txt` for transformers' CLIPTokenizer, equal to open_clip's bundled BPE."""
    merges = bpe_merges(bpe_path)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(merges), ensure_ascii=False))
    # CLIPTokenizer skips the first line as a header, like open_clip does
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def hf_clip_config(model_name: str):
    """transformers' CLIPConfig for an open_clip ViT/transformer config (plain GELU, 64-wide heads)."""
    from transformers import CLIPConfig

    cfg = open_clip.get_model_config(model_name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if cfg.get("quick_gelu") or "timm_model_name" in vision or "hf_model_name" in text:
        raise ValueError(f"{model_name} is not a plain ViT CLIP this bench can mirror in transformers")
    act = "gelu"
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config=dict(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // vision.get("head_width", 64),
                           intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
                           image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act),
        text_config=dict(hidden_size=text["width"], num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                         intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
                         max_position_embeddings=text["context_length"], vocab_size=text["vocab_size"],
                         hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def save_random_hf_clip(model_name: str, folder: Path, seed: int = 0) -> None:
    """Model (random weights), tokenizer and image processor in `folder`, loadable offline by any HF consumer."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = hf_clip_config(model_name)
    CLIPModel(config).eval().save_pretrained(folder)
    write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=config.text_config.max_position_embeddings)
    size = config.vision_config.image_size  # open_clip's eval transform: bicubic shortest side, centre crop
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(open_clip.OPENAI_DATASET_MEAN),
                                image_std=list(open_clip.OPENAI_DATASET_STD))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
