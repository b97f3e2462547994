"""Loading the tiny world CLIP shipped in ``service/assets/tiny_clip``.

The asset directory holds ``open_clip_config.json`` + ``weights.safetensors``, which open_clip
loads natively through its ``local-dir:`` schema (config, weights and preprocessing together)::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:service/assets/tiny_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:service/assets/tiny_clip")

``config.json`` is the same model config in open_clip's plain format; registering it by file makes
the file stem its model name::

    open_clip.add_model_config("service/assets/tiny_clip/config.json")       # registers "config"
    model = open_clip.create_model("config", pretrained="service/assets/tiny_clip/weights.safetensors")

Weights are stored as fp16 and loaded into an fp32 model (``load_state_dict`` casts).
"""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parents[2] / "service" / "assets" / "tiny_clip"


def load_tiny_clip(path: str | Path = ASSET_DIR, device: str = "cpu"):
    """Return ``(model, preprocess, tokenizer)`` for the tiny CLIP in ``path`` (eval mode, fp32)."""
    import open_clip

    path = Path(path)
    if not (path / "open_clip_config.json").is_file() or not (path / "weights.safetensors").is_file():
        raise FileNotFoundError(f"no tiny CLIP (open_clip_config.json + weights.safetensors) in {path}")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), preprocess, tokenizer
