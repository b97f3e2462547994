import pytest
from open_clip.tokenizer import SimpleTokenizer

from bench.hf_clip import HF_SPECIAL_TOKENS, bpe_merges, clip_vocab, write_clip_tokenizer_files

PHRASES = ["a photo of a dog.", "Hello, World! it's 3.14 o'clock", "a photo of a {}.", "naïve café – ünïcode"]


def test_vocab_is_open_clips_encoder_with_hf_special_token_names():
    open_clip_encoder = SimpleTokenizer().encoder
    renamed = {"<start_of_text>": HF_SPECIAL_TOKENS[0], "<end_of_text>": HF_SPECIAL_TOKENS[1]}
    assert clip_vocab(bpe_merges()) == {renamed.get(token, token): i for token, i in open_clip_encoder.items()}


def test_hf_tokenizer_from_the_written_files_encodes_like_open_clip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the bench extra (transformers) is not installed")
    write_clip_tokenizer_files(tmp_path)
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = SimpleTokenizer()
    for phrase in PHRASES:
        assert hf(phrase)["input_ids"] == [ours.sot_token_id, *ours.encode(phrase), ours.eot_token_id]


def test_hf_config_mirrors_the_open_clip_architecture_tower_by_tower():
    transformers = pytest.importorskip("transformers", reason="the bench extra (transformers) is not installed")
    import open_clip

    from bench.hf_clip import hf_clip_config

    ours = open_clip.create_model("test-micro", pretrained=None)
    hf = transformers.CLIPModel(hf_clip_config("test-micro"))

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    assert count(hf.vision_model, hf.visual_projection) == count(ours.visual)
    assert count(hf) == count(ours)
    assert hf.config.vision_config.num_attention_heads == 2  # width 64 / head_width 32
