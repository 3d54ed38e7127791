"""Small builders the training tests share: a real CLIP BPE tokenizer over a few words, a tiny random SD in the
diffusers folder layout (what the training scripts take as --pretrained-model), and PNG writing.

    from helpers.tiny_training import save_png, write_clip_tokenizer, write_tiny_sd
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_clip_tokenizer(folder: Path, words: Sequence[str]) -> int:
    """vocab.json + merges.txt of a CLIP BPE tokenizer in which each of ``words`` is one token; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for c in sorted(set("".join(words))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


CROSS_ATTN_BLOCKS = (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def write_tiny_sd(root: Path, words: Sequence[str], *, width: int = 16, text_layers: int = 1,
                  unet_blocks: tuple[tuple[str, str], tuple[str, str]] = CROSS_ATTN_BLOCKS) -> Path:
    """A random SD in diffusers layout under ``root`` (tokenizer over ``words``, CLIP text encoder, UNet, VAE, DDPM
    scheduler), drawn after ``torch.manual_seed(0)``. ``width``: the UNet's first block width (the second is twice
    that, heads of width/4 channels, latents width/2 px); the VAE is half as wide at twice the pixel size."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)
    write_clip_tokenizer(root / "tokenizer", words)
    tok = transformers.CLIPTokenizer.from_pretrained(str(root / "tokenizer"), model_max_length=77)
    tok.save_pretrained(str(root / "tokenizer"))
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).save_pretrained(str(root / "text_encoder"))
    diffusers.UNet2DConditionModel(
        sample_size=width // 2, layers_per_block=1, block_out_channels=(width, 2 * width),
        down_block_types=unet_blocks[0], up_block_types=unet_blocks[1],
        cross_attention_dim=32, attention_head_dim=width // 4, norm_num_groups=8,
    ).save_pretrained(str(root / "unet"))
    diffusers.AutoencoderKL(
        latent_channels=4, block_out_channels=(width // 2, width), layers_per_block=1, norm_num_groups=8, sample_size=width,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(str(root / "vae"))
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012).save_pretrained(str(root / "scheduler"))
    return root


def save_png(arr: np.ndarray, path: Path) -> None:
    """(H, W, 3) floats in [0, 1] (clipped) -> 8-bit PNG, creating the folder."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)
