"""Tiny randomly initialised foundation models, written to disk by their own libraries' save
functions (transformers `save_pretrained`, open_clip's hub layout, `timm.models.save_for_hf`), so
tests load them back through the real folder -> spec -> adapter path without any download."""

from __future__ import annotations

import json
from pathlib import Path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with no merges (every byte is a token): tiny, offline."""
    import transformers as tf

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return tf.CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


def save_hf_clip(folder: Path, *, seed: int = 0, image_size: int = 32, resize: int = 36, dim: int = 16):
    """CLIPModel + tokenizer + CLIPImageProcessor (resize short side to `resize`, centre-crop
    `image_size`) in `folder`; returns (model, tokenizer)."""
    import torch
    import transformers as tf

    tok, vocab_size = clip_tokenizer()
    torch.manual_seed(seed)
    cfg = tf.CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=1, bos_token_id=0,
                         pad_token_id=1, projection_dim=dim),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8, projection_dim=dim),
        projection_dim=dim,
    )
    model = tf.CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tf.CLIPImageProcessor(size={"shortest_edge": resize},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model, tok


def save_hf_siglip(folder: Path, *, seed: int = 1, image_size: int = 32):
    """SiglipModel + tokenizer + SiglipImageProcessor (squash to `image_size`); returns (model, tokenizer)."""
    import torch
    import transformers as tf

    tok, vocab_size = clip_tokenizer()
    torch.manual_seed(seed)
    cfg = tf.SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=1, eos_token_id=1,
                         bos_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
    )
    model = tf.SiglipModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tf.SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return model, tok


def open_clip_cfg() -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def save_open_clip(folder: Path, *, seed: int = 2, with_config: bool = True):
    """An open_clip CLIP in its hub layout (open_clip_config.json + open_clip_model.safetensors),
    or, with `with_config=False`, just the checkpoint; returns the model."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = CLIP(**open_clip_cfg()).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if with_config:
        (folder / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": open_clip_cfg(),
            "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "interpolation": "bicubic",
                               "resize_mode": "shortest"},
        }))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return model


def save_timm(folder: Path, *, seed: int = 3):
    """A timm ViT saved with `timm.models.save_for_hf` (config.json with pretrained_cfg + weights)."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    save_for_hf(model, folder, safe_serialization=True)
    return model
